"""One server interceptor that turns the error taxonomy into gRPC statuses.

Domain code raises ``protos.errors.MeshError`` subclasses; this is the only
place they become a status, so servicers stay free of transport details.
Any other exception escaping a handler is a bug: it is logged with its
traceback and answered INTERNAL naming the exception, and the server keeps
serving.
"""

from __future__ import annotations

import inspect
import logging

import grpc

from protos.errors import MeshError

log = logging.getLogger(__name__)


async def _abort(context: grpc.aio.ServicerContext, err: Exception, method: str):
    if isinstance(err, MeshError):
        await context.abort(err.code, err.message)
    log.exception("unexpected error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"{method}: {type(err).__name__}: {err}")


def _wrap_unary(behavior, method: str):
    async def wrapped(request, context):
        try:
            return await behavior(request, context)
        except (MeshError, Exception) as err:
            if isinstance(err, grpc.aio.AbortError):
                raise
            await _abort(context, err, method)
    return wrapped


def _wrap_streaming(behavior, method: str):
    async def wrapped(request, context):
        try:
            async for response in behavior(request, context):
                yield response
        except (MeshError, Exception) as err:
            if isinstance(err, grpc.aio.AbortError):
                raise
            await _abort(context, err, method)
    return wrapped


def _wrap_responses(behavior, method: str):
    """Streaming responses come from an async generator, or from a coroutine that calls context.write."""
    if inspect.isasyncgenfunction(behavior):
        return _wrap_streaming(behavior, method)
    return _wrap_unary(behavior, method)


class StatusInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        codec = dict(request_deserializer=handler.request_deserializer,
                     response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary(handler.unary_unary, method), **codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary(handler.stream_unary, method), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_wrap_responses(handler.unary_stream, method), **codec)
        return grpc.stream_stream_rpc_method_handler(_wrap_responses(handler.stream_stream, method), **codec)
