"""The asyncio client: the same API and guarantees as ``InferenceClient``, on grpc.aio.

Deadlines, retries (UNAVAILABLE only, never streams, backoff with
``asyncio.sleep``), error mapping and trace context behave exactly as in
``clients.sync_client``. Create, use and close a client on one event loop.
Cancelling the task awaiting a call cancels the RPC.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from meshserve.common.errors import MeshError, Unavailable
from meshserve.common.security.tls import TlsConfig
from meshserve.common.security.tokens import aio_token_interceptors
from meshserve.protos.inference import grpc_service_pb2 as pb

from .channel import bearer_token as _bearer_token
from .channel import channel_credentials as _channel_credentials
from .channel import channel_options as _channel_options
from .encoding import build_infer_request, build_stream_request, decode_infer_response, decode_stream_response
from .retry import DEFAULT_MAX_RETRIES, RetryPolicy, async_call_with_retries
from .status import from_rpc_error
from .stubs import Req, Resp, async_health_stub, async_inference_stub
from .tracing import StreamSpan, client_span


class AsyncInferStream:
    """The responses of one streamed request, as an async iterator of output dicts.

    Ends after the response marked ``triton_final_response`` (an empty final
    response is not yielded) or when the server ends the call. A stream
    error raises its taxonomy error and cancels the call. ``cancel()``,
    leaving an ``async with`` block early, cancelling the task that iterates,
    or dropping the iterator before the end (``break``) cancels the call.
    """

    def __init__(self, call: grpc.aio.StreamStreamCall[pb.ModelInferRequest, pb.ModelStreamInferResponse],
                 request: pb.ModelInferRequest) -> None:
        self._call = call
        self._request: pb.ModelInferRequest | None = request
        self._request_not_sent = False
        self._finished = False

    async def _send_request(self) -> None:
        """Write the one request and half-close. The request is written here, not from an
        iterator: grpc.aio reports a write that loses a race with the server ending the call
        as INTERNAL, hiding the server's status; a failed write here leaves that status for
        the read that follows."""
        request, self._request = self._request, None
        if request is None:
            return
        try:
            await self._call.write(request)
        except (grpc.RpcError, asyncio.InvalidStateError):
            self._request_not_sent = True
            return
        try:
            await self._call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass

    def __aiter__(self) -> AsyncInferStream:
        return self

    async def __anext__(self) -> dict[str, np.ndarray]:
        if self._request is not None and not self._finished:
            await self._send_request()
        while not self._finished:
            try:
                message = await self._call.read()
            except grpc.RpcError as err:
                self._finished = True
                if self._request_not_sent and err.code() == grpc.StatusCode.INTERNAL:
                    # grpc.aio replaced the server's status with its failed write's: all that is
                    # known is that the request never reached the server, which is UNAVAILABLE.
                    raise Unavailable(f"the server ended the stream before it took the request "
                                      f"({err.details()})") from err
                raise from_rpc_error(err) from err
            except asyncio.CancelledError:
                self.cancel()
                raise
            if not isinstance(message, pb.ModelStreamInferResponse):  # grpc.aio.EOF: the server ended the call
                self._finished = True
                break
            try:
                outputs, final = decode_stream_response(message)
            except MeshError:
                self.cancel()
                raise
            if final:
                self._finished = True
            if outputs is not None:
                return outputs
        raise StopAsyncIteration

    def cancel(self) -> None:
        """Cancel the call unless its responses are complete; idempotent."""
        if not self._finished:
            self._finished = True
            self._call.cancel()

    @property
    def cancelled(self) -> bool:
        """True if the call ended by cancellation (by ``cancel()`` or otherwise)."""
        return self._call.cancelled()

    async def __aenter__(self) -> AsyncInferStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        try:
            self.cancel()
        except Exception:  # the event loop may be closed already
            pass


class AsyncInferenceClient:
    """A KServe v2 / Triton gRPC asyncio client for one server address.

    Arguments as for ``InferenceClient``. Every call is a coroutine, except
    ``stream``, which returns an ``AsyncInferStream`` at once.
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
        interceptors = aio_token_interceptors(_bearer_token(token))
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=options,
                                                    interceptors=interceptors)
        self._stub = async_inference_stub(self._channel)
        self._health = async_health_stub(self._channel)
        self.address = address
        self.timeout = timeout
        self.retry_policy = RetryPolicy.of(retries)

    # -- lifecycle ---------------------------------------------------------

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- plumbing ----------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def _unary(self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req,
                     timeout: float | None) -> Resp:
        with client_span(request, self.address) as metadata:  # the CLIENT span covers the retries
            async def attempt(remaining: float | None) -> Resp:
                try:
                    return await method(request, timeout=remaining, metadata=metadata)
                except grpc.RpcError as err:
                    raise from_rpc_error(err) from err

            return await async_call_with_retries(
                attempt, self.retry_policy, self._deadline(timeout), sleep=asyncio.sleep, clock=time.monotonic
            )

    # -- inference ---------------------------------------------------------

    async def infer(
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
        return decode_infer_response(await self._unary(self._stub.ModelInfer, request, timeout))

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
    ) -> AsyncInferStream:
        """Send one request over ``ModelStreamInfer`` (decoupled models); ``async for`` its responses.

        ``timeout`` bounds the whole stream. Never retried.
        """
        request = build_stream_request(
            model, inputs, outputs, version=version, request_id=request_id,
            parameters=parameters, use_raw=use_raw,
        )
        span = StreamSpan(request, self.address)
        call = self._stub.ModelStreamInfer(timeout=self._deadline(timeout), metadata=span.metadata)
        return AsyncInferStream(span.wrap(call), request)

    # -- server and model state ------------------------------------------

    async def is_server_live(self, *, timeout: float | None = None) -> bool:
        return (await self._unary(self._stub.ServerLive, pb.ServerLiveRequest(), timeout)).live

    async def is_server_ready(self, *, timeout: float | None = None) -> bool:
        return (await self._unary(self._stub.ServerReady, pb.ServerReadyRequest(), timeout)).ready

    async def is_model_ready(self, model: str, version: str | None = None, *, timeout: float | None = None) -> bool:
        request = pb.ModelReadyRequest(name=model, version=version or "")
        return (await self._unary(self._stub.ModelReady, request, timeout)).ready

    async def server_metadata(self, *, timeout: float | None = None) -> pb.ServerMetadataResponse:
        return await self._unary(self._stub.ServerMetadata, pb.ServerMetadataRequest(), timeout)

    async def model_metadata(
        self, model: str, version: str | None = None, *, timeout: float | None = None
    ) -> pb.ModelMetadataResponse:
        request = pb.ModelMetadataRequest(name=model, version=version or "")
        return await self._unary(self._stub.ModelMetadata, request, timeout)

    async def model_config(
        self, model: str, version: str | None = None, *, timeout: float | None = None
    ) -> pb.ModelConfigResponse:
        request = pb.ModelConfigRequest(name=model, version=version or "")
        return await self._unary(self._stub.ModelConfig, request, timeout)

    async def model_statistics(
        self, model: str | None = None, version: str | None = None, *, timeout: float | None = None
    ) -> pb.ModelStatisticsResponse:
        """Statistics of one model, or of every model when ``model`` is None."""
        request = pb.ModelStatisticsRequest(name=model or "", version=version or "")
        return await self._unary(self._stub.ModelStatistics, request, timeout)

    async def repository_index(
        self, *, ready: bool = False, timeout: float | None = None
    ) -> pb.RepositoryIndexResponse:
        """The models of the repository (only the ready ones when ``ready``)."""
        request = pb.RepositoryIndexRequest(ready=ready)
        return await self._unary(self._stub.RepositoryIndex, request, timeout)

    async def load_model(self, model: str, *, timeout: float | None = None) -> pb.RepositoryModelLoadResponse:
        request = pb.RepositoryModelLoadRequest(model_name=model)
        return await self._unary(self._stub.RepositoryModelLoad, request, timeout)

    async def unload_model(self, model: str, *, timeout: float | None = None) -> pb.RepositoryModelUnloadResponse:
        request = pb.RepositoryModelUnloadRequest(model_name=model)
        return await self._unary(self._stub.RepositoryModelUnload, request, timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 Check: the status name (``"SERVING"``, ``"NOT_SERVING"``...)."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self._unary(self._health.Check, request, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
