"""Forwarding ``ModelStreamInfer``: each model of a stream pinned to one replica for the stream's life.

Guarantees:
- The first request naming a (model, version) opens one upstream stream to
  a replica chosen as for a unary call; every later request of that model
  on this client stream goes to the same upstream stream, so a replica
  sees a stream's requests in order and in one place. Bytes pass through
  as they came, both ways; responses are relayed as they arrive.
- A request naming no model, an unknown model, or one with no ready or
  reachable replica is answered in the stream, as the runtime answers a
  failing request: ``error_message`` "INVALID_ARGUMENT: ...", "NOT_FOUND:
  ..." or "UNAVAILABLE: ..." with the request's model and id; the stream
  goes on.
- A request whose input or output names a shared memory region is answered
  in the stream "INVALID_ARGUMENT: ..." and not forwarded (``proxy.host_local``).
- A request that is not a valid ``ModelInferRequest`` (garbage bytes) ends
  the stream at once with INVALID_ARGUMENT naming the defect, whatever the
  replica would make of it: each request is parsed here (protobuf's C
  parser, a transient copy of its bytes) before it is forwarded.
- An upstream stream that ends with an error status ends the client's
  stream with that status (the replica is taken out of rotation on
  UNAVAILABLE). Streams are not retried: part of one may have run.
- Cancelling the client's stream (or its deadline passing) cancels every
  upstream stream at once, so the replica stops generating.
- The client half-closing half-closes every upstream stream; the client's
  stream ends when every upstream stream has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

from meshserve.common.errors import InvalidArgument, MeshError
from meshserve.protos.inference import grpc_service_pb2 as pb

from .endpoints import Endpoint
from .forwarder import UpstreamFailure, Upstreams, no_replica, remaining_timeout
from .host_local import refuse_shared_memory
from .tracing import forwarded_metadata
from .wire import may_name_shared_memory, scan_request

METHOD = "ModelStreamInfer"
# Responses held for a slow client, over all of one stream's models.
RELAY_BUFFER = 64


class _Upstream:
    """One pinned upstream stream and the task relaying its responses."""

    def __init__(self, endpoint: Endpoint, call, model: str):
        self.endpoint = endpoint
        self.call = call
        self.model = model
        self.relay: asyncio.Task | None = None


class StreamForwarder:
    def __init__(self, upstreams: Upstreams):
        self.up = upstreams

    async def forward(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
        """An async generator of raw response bytes for the client's stream of raw request bytes."""
        incoming = context.invocation_metadata()
        with self.up.tracing.server_span(METHOD, incoming, current=False) as span:
            metadata = self.up.tracing.upstream_metadata(forwarded_metadata(incoming), span)
            session = _Session(self.up, context, metadata, span)
            reader = asyncio.create_task(session.read(requests))
            try:
                while (item := await session.out.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                await reader
            finally:
                reader.cancel()
                session.cancel_all()


class _Session:
    def __init__(self, up: Upstreams, context, metadata, span):
        self.up = up
        self.context = context
        self.metadata = metadata
        self.span = span
        # bytes | Exception | None (the end). Bounded: a slow client slows the relays,
        # and HTTP/2 flow control then slows the replica, instead of the proxy buffering.
        self.out: asyncio.Queue = asyncio.Queue(maxsize=RELAY_BUFFER)
        self.streams: dict[tuple[str, str], _Upstream] = {}
        self.open = 0

    async def read(self, requests: AsyncIterator[bytes]) -> None:
        try:
            async for raw in requests:
                head = scan_request(raw, with_id=True)
                parsed = _parse(raw)
                shared_memory = may_name_shared_memory(raw)
                upstream = self.streams.get((head.model, head.version))
                if upstream is None or shared_memory:
                    try:
                        if not head.model:
                            raise InvalidArgument(f"{METHOD}: the request names no model")
                        if shared_memory:
                            refuse_shared_memory(parsed)
                        upstream = upstream or await self._open(head.model, head.version)
                    except MeshError as err:
                        self.up.metrics.rejected.labels(err.code.name).inc()
                        await self.out.put(_error_response(err, head.model, head.id))
                        continue
                self.up.metrics.count.labels(head.model, head.version, upstream.endpoint.info.replica_id).inc()
                try:
                    await upstream.call.write(raw)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    pass  # the upstream stream already ended; its relay reports how
            for upstream in self.streams.values():
                try:
                    await upstream.call.done_writing()
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    pass
        except Exception as err:  # a malformed request, or the client's stream failing
            # Without its traceback: that holds this frame and the request bytes (see UpstreamFailure).
            await self.out.put(err.with_traceback(None))
            return
        await asyncio.gather(*(u.relay for u in self.streams.values() if u.relay is not None), return_exceptions=True)
        await self.out.put(None)

    async def _open(self, model: str, version: str) -> _Upstream:
        routes = await self.up.ready_routes(model, version, remaining_timeout(self.context))
        endpoint = self.up.balancer.pick(routes, self.up.pool)
        if endpoint is None:
            raise no_replica(model, routes, None)
        call = endpoint.stream(METHOD)(timeout=remaining_timeout(self.context), metadata=self.metadata)
        upstream = self.streams[(model, version)] = _Upstream(endpoint, call, model)
        self.span.set_attribute("meshserve.model", model)
        self.span.set_attribute("meshserve.replica", endpoint.info.replica_id)
        self.span.set_attribute("meshserve.node", endpoint.info.node)
        upstream.relay = asyncio.create_task(self._relay(upstream, version))
        return upstream

    async def _relay(self, upstream: _Upstream, version: str) -> None:
        endpoint, metrics = upstream.endpoint, self.up.metrics
        labels = (upstream.model, version, endpoint.info.replica_id)
        endpoint.outstanding += 1
        metrics.pending.labels(*labels).inc()
        code = grpc.StatusCode.CANCELLED
        try:
            async for response in upstream.call:
                await self.out.put(response)
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            failure = UpstreamFailure.of(err)
            code = failure.code
            if code == grpc.StatusCode.UNAVAILABLE:
                endpoint.mark_failed()
            await self.out.put(failure.error().with_traceback(None))
        finally:
            endpoint.outstanding -= 1
            metrics.pending.labels(*labels).dec()
            metrics.streams.labels(upstream.model, endpoint.info.replica_id, code.name).inc()

    def cancel_all(self) -> None:
        for upstream in self.streams.values():
            upstream.call.cancel()
            if upstream.relay is not None:
                upstream.relay.cancel()


def _parse(raw: bytes) -> pb.ModelInferRequest:
    """``raw`` parsed; InvalidArgument unless it is a ``ModelInferRequest`` protobuf would accept."""
    try:
        return pb.ModelInferRequest.FromString(raw)
    except DecodeError as err:
        raise InvalidArgument(f"{METHOD}: malformed request: {err}") from None


def _error_response(err: MeshError, model: str, request_id: str) -> bytes:
    return pb.ModelStreamInferResponse(
        error_message=f"{err.code.name}: {err.message}",
        infer_response=pb.ModelInferResponse(model_name=model, id=request_id),
    ).SerializeToString()
