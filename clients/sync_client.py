"""The blocking client: numpy in and out over one gRPC channel.

Guarantees, for every call:

* a deadline: the call's ``timeout`` or else the client's default (None
  means no deadline); for a unary call it bounds the retries too;
* retries of unary calls on UNAVAILABLE only, bounded by the ``retries``
  policy (see ``clients.retry``); streams are never retried;
* every ``grpc.RpcError`` surfaces as the taxonomy error of its status code
  with the server's message (``raise ... from`` the RpcError);
* the caller's OpenTelemetry trace context, when a span is current, travels
  as W3C ``traceparent`` metadata.

A client is safe to share between threads (gRPC channels are).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from meshserve.common.errors import MeshError
from meshserve.common.security.tls import TlsConfig
from meshserve.common.security.tokens import with_token
from meshserve.protos.inference import grpc_service_pb2 as pb

from .channel import bearer_token as _bearer_token
from .channel import channel_credentials as _channel_credentials
from .channel import channel_options as _channel_options
from .encoding import build_infer_request, build_stream_request, decode_infer_response, decode_stream_response
from .retry import DEFAULT_MAX_RETRIES, RetryPolicy, call_with_retries
from .status import from_rpc_error
from .stubs import Req, Resp, StreamCall, health_stub, inference_stub
from .tracing import StreamSpan, client_span


class InferStream:
    """The responses of one streamed request, as an iterator of output dicts.

    Ends after the response marked ``triton_final_response`` (an empty final
    response is not yielded) or when the server ends the call. A stream
    error raises its taxonomy error and cancels the call. ``cancel()``,
    leaving a ``with`` block early, or dropping the iterator before the end
    (``break`` out of a ``for``) cancels the call; the server sees CANCELLED.
    """

    def __init__(self, call: StreamCall) -> None:
        self._call = call
        self._finished = False

    def __iter__(self) -> InferStream:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._finished:
            try:
                message = next(self._call)
            except StopIteration:
                self._finished = True
                break
            except grpc.RpcError as err:
                self._finished = True
                raise from_rpc_error(err) from err
            try:
                outputs, final = decode_stream_response(message)
            except MeshError:
                self.cancel()
                raise
            if final:
                self._finished = True
            if outputs is not None:
                return outputs
        raise StopIteration

    def cancel(self) -> None:
        """Cancel the call unless its responses are complete; idempotent."""
        if not self._finished:
            self._finished = True
            self._call.cancel()

    @property
    def cancelled(self) -> bool:
        """True if the call ended by cancellation (by ``cancel()`` or otherwise)."""
        return self._call.cancelled()

    close = cancel

    def __enter__(self) -> InferStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        try:
            self.cancel()
        except Exception:  # interpreter shutdown: the channel may be gone already
            pass


class InferenceClient:
    """A KServe v2 / Triton gRPC client for one server address.

    ``timeout`` is the default deadline in seconds for every call;
    ``retries`` is a retry count or a ``RetryPolicy``; ``credentials``
    (``grpc.ssl_channel_credentials(...)``) or ``tls`` (a
    ``protos.security.tls.TlsConfig``: CA bundle, client certificate and key
    files) makes the channel TLS; with neither, the ``MESHSERVE_TLS_*``
    environment decides, as for every daemon (none set: plaintext);
    ``channel_options`` overlay the defaults of ``clients.channel``;
    ``token`` (else ``$MESHSERVE_TOKEN``) is sent as ``authorization:
    Bearer TOKEN`` on every call, for servers with a ``--token-file``.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = None,
        retries: int | RetryPolicy = DEFAULT_MAX_RETRIES,
        credentials: grpc.ChannelCredentials | None = None,
        tls: TlsConfig | None = None,
        channel_options: Sequence[tuple[str, object]] | None = None,
        token: str | None = None,
    ) -> None:
        options = _channel_options(channel_options)
        credentials = _channel_credentials(credentials, tls)
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._channel = with_token(self._channel, _bearer_token(token))
        self._stub = inference_stub(self._channel)
        self._health = health_stub(self._channel)
        self.address = address
        self.timeout = timeout
        self.retry_policy = RetryPolicy.of(retries)

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _unary(self, method: grpc.UnaryUnaryMultiCallable[Req, Resp], request: Req, timeout: float | None) -> Resp:
        with client_span(request, self.address) as metadata:  # the CLIENT span covers the retries
            def attempt(remaining: float | None) -> Resp:
                try:
                    return method(request, timeout=remaining, metadata=metadata)
                except grpc.RpcError as err:
                    raise from_rpc_error(err) from err

            return call_with_retries(
                attempt, self.retry_policy, self._deadline(timeout), sleep=time.sleep, clock=time.monotonic
            )

    # -- inference ---------------------------------------------------------

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        version: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        parameters: Mapping[str, object] | None = None,
        *,
        use_raw: bool = True,
    ) -> dict[str, np.ndarray]:
        """Run one inference; returns output name -> array (all outputs unless ``outputs`` names some)."""
        request = build_infer_request(
            model, inputs, outputs, version=version, request_id=request_id,
            parameters=parameters, use_raw=use_raw,
        )
        return decode_infer_response(self._unary(self._stub.ModelInfer, request, timeout))

    def stream(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        version: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        parameters: Mapping[str, object] | None = None,
        *,
        use_raw: bool = True,
    ) -> InferStream:
        """Send one request over ``ModelStreamInfer`` (decoupled models); iterate its responses.

        ``timeout`` bounds the whole stream. Never retried.
        """
        request = build_stream_request(
            model, inputs, outputs, version=version, request_id=request_id,
            parameters=parameters, use_raw=use_raw,
        )
        span = StreamSpan(request, self.address)
        call = self._stub.ModelStreamInfer(iter((request,)), timeout=self._deadline(timeout), metadata=span.metadata)
        return InferStream(span.wrap(call))

    # -- server and model state ------------------------------------------

    def is_server_live(self, *, timeout: float | None = None) -> bool:
        return self._unary(self._stub.ServerLive, pb.ServerLiveRequest(), timeout).live

    def is_server_ready(self, *, timeout: float | None = None) -> bool:
        return self._unary(self._stub.ServerReady, pb.ServerReadyRequest(), timeout).ready

    def is_model_ready(self, model: str, version: str | None = None, *, timeout: float | None = None) -> bool:
        request = pb.ModelReadyRequest(name=model, version=version or "")
        return self._unary(self._stub.ModelReady, request, timeout).ready

    def server_metadata(self, *, timeout: float | None = None) -> pb.ServerMetadataResponse:
        return self._unary(self._stub.ServerMetadata, pb.ServerMetadataRequest(), timeout)

    def model_metadata(
        self, model: str, version: str | None = None, *, timeout: float | None = None
    ) -> pb.ModelMetadataResponse:
        request = pb.ModelMetadataRequest(name=model, version=version or "")
        return self._unary(self._stub.ModelMetadata, request, timeout)

    def model_config(
        self, model: str, version: str | None = None, *, timeout: float | None = None
    ) -> pb.ModelConfigResponse:
        request = pb.ModelConfigRequest(name=model, version=version or "")
        return self._unary(self._stub.ModelConfig, request, timeout)

    def model_statistics(
        self, model: str | None = None, version: str | None = None, *, timeout: float | None = None
    ) -> pb.ModelStatisticsResponse:
        """Statistics of one model, or of every model when ``model`` is None."""
        request = pb.ModelStatisticsRequest(name=model or "", version=version or "")
        return self._unary(self._stub.ModelStatistics, request, timeout)

    def repository_index(self, *, ready: bool = False, timeout: float | None = None) -> pb.RepositoryIndexResponse:
        """The models of the repository (only the ready ones when ``ready``)."""
        request = pb.RepositoryIndexRequest(ready=ready)
        return self._unary(self._stub.RepositoryIndex, request, timeout)

    def load_model(self, model: str, *, timeout: float | None = None) -> pb.RepositoryModelLoadResponse:
        request = pb.RepositoryModelLoadRequest(model_name=model)
        return self._unary(self._stub.RepositoryModelLoad, request, timeout)

    def unload_model(self, model: str, *, timeout: float | None = None) -> pb.RepositoryModelUnloadResponse:
        request = pb.RepositoryModelUnloadRequest(model_name=model)
        return self._unary(self._stub.RepositoryModelUnload, request, timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 Check: the status name (``"SERVING"``, ``"NOT_SERVING"``...)."""
        response = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
