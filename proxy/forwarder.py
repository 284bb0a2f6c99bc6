"""Forwarding one unary call: route, choose a replica, send the raw bytes, retry what never ran.

Guarantees:
- The request bytes go to the replica as they came and the response bytes
  come back as they went; only fields 1-2 (model name, version) are read,
  and a ModelInfer request whose tensors may name a shared memory region is
  parsed and refused if one does (``proxy.host_local``).
- A call is retried on another replica only when the replica answered
  UNAVAILABLE: refused, unreachable, draining, or gone before answering
  (which for inference, free of side effects, is safe to run again). At
  most ``max_retries`` times per call and within the ``RetryBudget``. Any
  other status (DEADLINE_EXCEEDED, INTERNAL, INVALID_ARGUMENT, ...) is the
  answer, passed through with its message.
- A replica that answered UNAVAILABLE leaves rotation at once (its health
  watch puts it back).
- A replica takes a bounded number of calls at once from this proxy; more
  wait their turn within their deadline, and beyond a bounded queue a call
  is refused with RESOURCE_EXHAUSTED naming the replica (``proxy.admission``).
- The client's remaining deadline is the upstream timeout; its metadata is
  forwarded (with the proxy span's trace context).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import grpc
from google.protobuf.message import DecodeError

from meshserve.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    MeshError,
    NotFound,
    Unavailable,
    error_for_status,
)
from meshserve.protos.inference import grpc_service_pb2 as pb

from .balancer import Balancer
from .cold_start import ColdStarts
from .endpoints import Endpoint, EndpointPool
from .host_local import refuse_shared_memory
from .metrics import ProxyMetrics
from .retry_budget import RetryBudget
from .routes import Route, RouteTable
from .tracing import ProxyTracing, forwarded_metadata
from .wire import may_name_shared_memory, scan_request

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
INFER = "ModelInfer"


def _parse_infer_request(request: bytes) -> pb.ModelInferRequest:
    try:
        return pb.ModelInferRequest.FromString(request)
    except DecodeError as err:
        raise InvalidArgument(f"{INFER}: malformed request: {err}") from None


@dataclass
class Upstreams:
    """What every forwarded call shares: the table, the replicas, the policies, the telemetry."""

    table: Callable[[], RouteTable | None]
    pool: EndpointPool
    balancer: Balancer
    budget: RetryBudget
    metrics: ProxyMetrics
    tracing: ProxyTracing
    max_retries: int = 2
    cold_starts: ColdStarts | None = None   # holds calls for models scaled to zero; None: they fail at once

    def routes(self, model: str, version: str) -> list[Route]:
        """The routes of ``model`` (at ``version``), kept even with no endpoint (a deployed model
        with no ready replica: the caller answers Unavailable). NotFound only for a model (or
        version) the table does not list at all; Unavailable with no table yet."""
        table = self.table()
        if table is None:
            raise Unavailable("the proxy has no route table yet (no scheduler reached)")
        routes = table.routes_for(model, version)
        if not routes:
            if version and table.routes_for(model):
                raise NotFound(f"unknown version '{version}' of model '{model}'")
            raise NotFound(f"unknown model '{model}'")
        return routes

    async def ready_routes(self, model: str, version: str, wait_s: float | None) -> list[Route]:
        """``routes``, after waiting (bounded) for a replica when the model is scaled to zero."""
        routes = self.routes(model, version)
        if self.cold_starts is not None and not any(r.endpoints for r in routes) \
                and any(r.wakes_on_call for r in routes):
            routes = await self.cold_starts.hold(model, version, routes, wait_s)
        return routes


def remaining_timeout(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded("deadline exceeded before the call was forwarded")
    return remaining


class UpstreamFailure(NamedTuple):
    """How a replica failed a call: its status, kept apart from the ``AioRpcError``.

    Memory: grpc.aio keeps a failed call's error in a reference cycle (call,
    task, error, traceback), and the traceback holds every frame the error
    crossed, with the request bytes in them (up to the message limit). Only
    the garbage collector frees such a cycle, late: refused large requests
    piled up (2.9 GB after fifteen 250 MB ones). ``of`` cuts the traceback,
    so the cycle holds no frame of the proxy, and errors raised from here
    chain nothing.
    """

    code: grpc.StatusCode
    details: str

    @classmethod
    def of(cls, err: grpc.aio.AioRpcError) -> UpstreamFailure:
        failure = cls(err.code(), err.details() or "")
        err.__traceback__ = None
        return failure

    def error(self) -> MeshError:
        return error_for_status(self.code, self.details)


def no_replica(model: str, routes: list[Route], last: UpstreamFailure | None) -> Unavailable:
    """Unavailable (clients retry it) for a model the table lists: none of its replicas is ready
    (the route lists no endpoint, e.g. while replacements start), or none is reachable."""
    if not any(route.endpoints for route in routes):
        reasons = sorted({route.no_endpoint_reason for route in routes if route.no_endpoint_reason})
        return Unavailable(f"no ready replica of model '{model}'" + (f": {'; '.join(reasons)}" if reasons else ""))
    why = f": last answer {last.code.name}: {last.details}" if last else ""
    return Unavailable(f"no replica of model '{model}' is reachable{why}")


class UnaryForwarder:
    def __init__(self, upstreams: Upstreams):
        self.up = upstreams

    def reject(self, err: MeshError) -> MeshError:
        self.up.metrics.rejected.labels(err.code.name).inc()
        return err

    async def forward(self, method: str, request: bytes, context: grpc.aio.ServicerContext,
                      count: bool = False) -> bytes:
        """Forward a model-scoped unary call (ModelInfer, ModelMetadata, ModelConfig); ``count``: metrics."""
        incoming = context.invocation_metadata()
        with self.up.tracing.server_span(method, incoming) as span:
            try:
                head = scan_request(request)
                if not head.model:
                    raise InvalidArgument(f"{method}: the request names no model")
                if method == INFER and may_name_shared_memory(request):
                    refuse_shared_memory(_parse_infer_request(request))
                routes = await self.up.ready_routes(head.model, head.version, remaining_timeout(context))
            except MeshError as err:
                raise self.reject(err) from None
            span.set_attribute("meshserve.model", head.model)
            metadata = forwarded_metadata(incoming)
            return await self._attempts(method, request, context, head.model, head.version, routes,
                                        self.up.tracing.upstream_metadata(metadata), span, count)

    async def _attempts(self, method, request, context, model, version, routes, metadata, span, count) -> bytes:
        up, metrics = self.up, self.up.metrics
        tried: set[str] = set()
        last: UpstreamFailure | None = None
        up.budget.record_call()
        while True:
            endpoint = up.balancer.pick(routes, up.pool, tried)
            if endpoint is None:
                raise self.reject(no_replica(model, routes, last))
            span.set_attribute("meshserve.replica", endpoint.info.replica_id)
            span.set_attribute("meshserve.node", endpoint.info.node)
            try:
                return await self._one(endpoint, method, request, context, metadata, model, version, count)
            except grpc.aio.AioRpcError as err:
                last = UpstreamFailure.of(err)
            # Decided outside the except block, so no error raised below chains the upstream one.
            if last.code not in RETRYABLE:
                raise last.error()
            endpoint.mark_failed()
            tried.add(endpoint.address)
            if len(tried) > up.max_retries:
                raise last.error()
            if not up.budget.try_spend():
                metrics.retries_refused.labels(model).inc()
                raise last.error()
            metrics.retries.labels(model, last.code.name).inc()
            span.add_event("retry", {"meshserve.replica": endpoint.info.replica_id,
                                     "rpc.grpc.status_code": last.code.value[0],
                                     "error.message": last.details})

    async def _one(self, endpoint: Endpoint, method: str, request: bytes, context: grpc.aio.ServicerContext,
                   metadata, model: str, version: str, count: bool) -> bytes:
        """One attempt on ``endpoint``, once its admission control lets the call through."""
        metrics = self.up.metrics
        labels = (model, version, endpoint.info.replica_id)
        endpoint.outstanding += 1
        try:
            await endpoint.admission.acquire(remaining_timeout(context), len(request),
                                             f"replica {endpoint.info.replica_id} of model '{model}'")
        except MeshError as err:
            endpoint.outstanding -= 1
            raise self.reject(err) from None
        if count:
            metrics.pending.labels(*labels).inc()
            metrics.count.labels(*labels).inc()
        start = time.monotonic()
        try:
            response = await endpoint.unary(method)(request, timeout=remaining_timeout(context), metadata=metadata)
        except grpc.aio.AioRpcError as err:
            if count:
                metrics.failure.labels(*labels, err.code().name).inc()
            raise
        finally:
            endpoint.admission.release()
            endpoint.outstanding -= 1
            if count:
                metrics.pending.labels(*labels).dec()
        if count:
            elapsed = time.monotonic() - start
            metrics.success.labels(*labels).inc()
            metrics.duration_us.labels(*labels).inc(int(elapsed * 1e6))
            metrics.latency.labels(model, version).observe(elapsed)
        return response
