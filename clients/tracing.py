"""Client spans and W3C trace context for outgoing calls.

The library never configures OpenTelemetry; it uses whatever the
application installed:

* With an SDK tracer provider installed, every call gets a CLIENT span
  (``inference.GRPCInferenceService/ModelInfer`` ...) that is a child of the
  application's current span, and the call carries that span's context as
  W3C ``traceparent``/``tracestate`` metadata, so the proxy's and the
  replica's spans join the application's trace. A unary call's span covers
  its retries; a stream's span lasts until its final response, its error or
  its cancellation, with one ``response`` event per response.
* Without one (the API's no-op tracer), no span is recorded; the current
  context, if the application has a valid span from elsewhere, is still
  injected. With no valid current span this is one context lookup and no
  metadata at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from meshserve.protos.inference import grpc_service_pb2 as pb

Metadata = tuple[tuple[str, str], ...]
_Call = TypeVar("_Call")

# A module-level API tracer is a proxy: it records through the SDK provider
# once the application installs one, and is a no-op until then.
_TRACER = trace.get_tracer("meshserve.clients")

INFERENCE_SERVICE = "inference.GRPCInferenceService"
_HEALTH_SERVICE = "grpc.health.v1.Health"
_FINAL_RESPONSE = "triton_final_response"


def trace_metadata() -> Metadata | None:
    """gRPC metadata carrying the current trace context, or None when there is none."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    return _inject(None)


def _inject(context: Context | None) -> Metadata | None:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    # gRPC metadata keys must be lowercase.
    return tuple((key.lower(), value) for key, value in carrier.items()) or None


def _rpc_of(request: Message) -> tuple[str, str]:
    """(service, method) of the unary RPC that takes ``request`` (``ModelInferRequest`` -> ModelInfer)."""
    package, _, message = request.DESCRIPTOR.full_name.rpartition(".")
    if package == "grpc.health.v1":
        return _HEALTH_SERVICE, "Check"
    return INFERENCE_SERVICE, message.removesuffix("Request")


def _start(service: str, method: str, request: Message, address: str) -> trace.Span:
    attributes: dict[str, str | int] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    host, _, port = address.rpartition(":")
    if host and port.isdigit():
        attributes["server.address"] = host.strip("[]")
        attributes["server.port"] = int(port)
    else:
        attributes["server.address"] = address
    model = getattr(request, "model_name", "") or getattr(request, "name", "")
    if model:
        attributes["meshserve.model.name"] = model
    request_id = getattr(request, "id", "")
    if request_id:
        attributes["meshserve.request.id"] = request_id
    return _TRACER.start_span(f"{service}/{method}", kind=SpanKind.CLIENT, attributes=attributes)


def _status_code(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)):
        return error.code()
    code = getattr(error, "code", None)  # the taxonomy errors carry their status as a class attribute
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _fail(span: trace.Span, error: BaseException) -> None:
    span.set_attribute("rpc.grpc.status_code", _status_code(error).value[0])
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    span.set_status(Status(StatusCode.ERROR, message))
    span.record_exception(error)


@contextlib.contextmanager
def client_span(request: Message, address: str) -> Iterator[Metadata | None]:
    """A CLIENT span around one unary call (retries included); yields the call's metadata."""
    span = _start(*_rpc_of(request), request, address)
    if not span.is_recording():  # no SDK installed by the application
        yield trace_metadata()
        return
    try:
        yield _inject(trace.set_span_in_context(span))
    except BaseException as err:
        _fail(span, err)
        raise
    else:
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
    finally:
        span.end()


class StreamSpan:
    """The CLIENT span of one ``ModelStreamInfer`` call.

    Pass ``metadata`` to the call, then hand the call to ``wrap``; the span
    ends at the final response, an error, the end of the call or its
    cancellation, whichever comes first.
    """

    def __init__(self, request: Message, address: str) -> None:
        span = _start(INFERENCE_SERVICE, "ModelStreamInfer", request, address)
        if span.is_recording():
            self._span: trace.Span | None = span
            self.metadata = _inject(trace.set_span_in_context(span))
        else:
            self._span = None
            self.metadata = trace_metadata()
        self._responses = 0

    def wrap(self, call: _Call) -> _Call:
        """``call`` itself when nothing is recorded, else a proxy of it that reports to the span
        (it forwards every other attribute to ``call``, so it stands in for it)."""
        return call if self._span is None else cast(_Call, _TracedStreamCall(call, self))

    def response(self, message: pb.ModelStreamInferResponse) -> None:
        span = self._span
        if span is None:
            return
        final = bool(message.infer_response.parameters[_FINAL_RESPONSE].bool_param) \
            if _FINAL_RESPONSE in message.infer_response.parameters else False
        span.add_event("response", {"meshserve.response.index": self._responses,
                                    "meshserve.response.final": final})
        self._responses += 1
        if message.error_message:
            span.set_status(Status(StatusCode.ERROR, message.error_message))
            self.end()
        elif final:
            self.end(grpc.StatusCode.OK)

    def end(self, code: grpc.StatusCode | None = None, error: BaseException | None = None) -> None:
        """End the span once; later calls do nothing."""
        span, self._span = self._span, None
        if span is None:
            return
        if error is not None:
            _fail(span, error)
        elif code is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.end()


class _TracedStreamCall:
    """A sync (``next``) or grpc.aio (``read``) stream call that reports to its ``StreamSpan``."""

    def __init__(self, call: Any, span: StreamSpan) -> None:  # Any: a sync or a grpc.aio stream call
        self._call = call
        self._span = span

    def __iter__(self) -> _TracedStreamCall:
        return self

    def __next__(self) -> pb.ModelStreamInferResponse:
        try:
            message: pb.ModelStreamInferResponse = next(self._call)
        except StopIteration:
            self._span.end(grpc.StatusCode.OK)
            raise
        except grpc.RpcError as err:
            self._span.end(error=err)
            raise
        self._span.response(message)
        return message

    async def read(self) -> object:  # a response or grpc.aio.EOF
        try:
            message: object = await self._call.read()
        except grpc.RpcError as err:
            self._span.end(error=err)
            raise
        if isinstance(message, pb.ModelStreamInferResponse):
            self._span.response(message)
        else:  # grpc.aio.EOF
            self._span.end(grpc.StatusCode.OK)
        return message

    def cancel(self) -> bool:
        self._span.end(grpc.StatusCode.CANCELLED)
        return bool(self._call.cancel())

    def __getattr__(self, name: str) -> Any:  # write, done_writing, cancelled, code, ... of the call itself
        return getattr(self._call, name)

    def __del__(self) -> None:
        try:
            self._span.end(grpc.StatusCode.CANCELLED)
        except Exception:  # interpreter shutdown
            pass
