"""One server interceptor that turns the error taxonomy into gRPC statuses.

Domain code raises ``protos.errors.MeshError`` subclasses; this is the only
place they become a status, so servicers stay free of transport details.
Any other exception escaping a handler is a bug: it is logged with its
traceback and answered INTERNAL naming the exception, and the server keeps
serving.

Guarantees:
- A request that is not a valid protobuf message of its method's type is
  INVALID_ARGUMENT ("malformed ..."), never UNKNOWN: the interceptor takes
  the raw bytes from gRPC and decodes them itself, before the handler (unary)
  or as the handler's request iterator yields them (streams). Handlers read
  their requests through that iterator, not ``context.read()``.
- Every status message is bounded (``protos.errors.status_message``), so an
  error that echoes hostile input still reaches the client as itself.
- A failed request leaves nothing behind: the status is set after the error
  has been handled and released (no ``context.abort``, whose exception would
  chain the error, its traceback and every frame holding the request into a
  reference cycle inside gRPC), and the error's tracebacks are cleared, so
  the request's memory goes back when the call ends, without waiting for the
  cyclic garbage collector.
"""

from __future__ import annotations

import inspect
import logging

import grpc
from google.protobuf.message import DecodeError

from meshserve.common.errors import InvalidArgument, MeshError, drop_tracebacks, status_message

log = logging.getLogger(__name__)


def _status_of(err: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """The status for an error escaping a handler; an unexpected one is logged with its traceback."""
    if isinstance(err, MeshError):
        return err.code, err.message
    log.exception("unexpected error in %s", method)
    return grpc.StatusCode.INTERNAL, f"{method}: {type(err).__name__}: {err}"


def _set_status(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    context.set_code(code)
    context.set_details(status_message(message))


def _decoder(deserializer, method: str):
    """Raw request bytes -> message; a malformed message is InvalidArgument."""
    what = method.rsplit("/", 1)[-1]

    def decode(raw: bytes):
        try:
            return deserializer(raw)
        except DecodeError as err:
            raise InvalidArgument(f"malformed {what} request: {len(raw)} bytes that do not parse "
                                  f"({err})") from None
    return decode


class _DecodingIterator:
    """The handler's request iterator over raw messages, decoding each one as it is read.

    A class rather than an async generator, so a cancelled read (a timeout
    around one ``__anext__``) does not close the stream of requests.
    """

    def __init__(self, raw_requests, decode):
        self._raw = raw_requests.__aiter__()
        self._decode = decode

    def __aiter__(self):
        return self

    async def __anext__(self):
        return self._decode(await self._raw.__anext__())


def _wrap_unary(behavior, method: str, decode, streaming_requests: bool):
    async def wrapped(request, context):
        try:
            if decode is not None:
                request = _DecodingIterator(request, decode) if streaming_requests else decode(request)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            code, message = _status_of(err, method)
            drop_tracebacks(err)
        del request
        _set_status(context, code, message)  # outside the except block: nothing chains the error
        return None
    return wrapped


def _wrap_streaming(behavior, method: str, decode, streaming_requests: bool):
    async def wrapped(request, context):
        try:
            if decode is not None:
                request = _DecodingIterator(request, decode) if streaming_requests else decode(request)
            async for response in behavior(request, context):
                yield response
            return
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            code, message = _status_of(err, method)
            drop_tracebacks(err)
        del request
        _set_status(context, code, message)
    return wrapped


def _wrap(behavior, method: str, decode, streaming_requests: bool):
    """Streaming responses come from an async generator, or from a coroutine that calls context.write."""
    if inspect.isasyncgenfunction(behavior):
        return _wrap_streaming(behavior, method, decode, streaming_requests)
    return _wrap_unary(behavior, method, decode, streaming_requests)


class StatusInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        deserializer = handler.request_deserializer
        decode = None if deserializer is None else _decoder(deserializer, method)
        codec = dict(request_deserializer=None, response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap(handler.unary_unary, method, decode, False), **codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap(handler.stream_unary, method, decode, True), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap(handler.unary_stream, method, decode, False), **codec)
        return grpc.stream_stream_rpc_method_handler(
            _wrap(handler.stream_stream, method, decode, True), **codec)
