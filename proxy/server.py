"""Assembling the proxy: gRPC front, route source, replicas, metrics endpoint.

``ProxyServer`` is the programmatic entry point (tests, ``scheduler dev``):
``await start()``, then ``address`` (and ``metrics_address``) are known;
``await stop()`` closes everything it opened.

Lifecycle guarantees:
- The proxy listens at once; ServerReady and ``grpc.health.v1`` say
  SERVING from the first route table on (from the scheduler's watch, or
  the static table given), and stay SERVING while the scheduler is away:
  the last table is kept.
- ``stop(grace)`` turns health NOT_SERVING, lets calls in flight finish
  for ``grace`` seconds, then closes the replica channels.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace

from meshserve.common import limits
from meshserve.common.listen import grpc_server
from meshserve.common.metrics_http import MetricsHttpServer
from meshserve.common.security.auth import Authenticator, AuthInterceptor
from meshserve.common.security.roles import RoleTable, data_plane_table
from meshserve.common.security.tls import TlsConfig, add_port
from meshserve.common.status_interceptor import StatusInterceptor

from .balancer import Balancer
from .cold_start import DEFAULT_MAX_HELD, DEFAULT_MAX_WAIT_S, ColdStarts
from .endpoints import SERVICE_NAME, EndpointPool
from .follower import RouteFollower
from .forwarder import UnaryForwarder, Upstreams
from .metrics import ProxyMetrics
from .retry_budget import RetryBudget
from .routes import RouteTable
from .servicer import ProxyServicer, service_handler
from .streams import StreamForwarder
from .tracing import ProxyTracing

log = logging.getLogger(__name__)


# grpc core queues calls its application has not picked up yet, at most 1,000
# by default (grpc.server.max_pending_requests), and sheds the rest with a
# bare CANCELLED: 3,000 calls at once through the proxy lost ~600 so. The
# proxy picks calls up quickly and bounds them per replica itself
# (proxy.admission: waiting, or RESOURCE_EXHAUSTED with a message), so its
# front door queues a burst of this size rather than dropping it.
FRONT_DOOR_PENDING_REQUESTS = 20_000
FRONT_DOOR_QUEUE = [("grpc.server.max_pending_requests_hard_limit", 40_000)]


@dataclass
class ProxyOptions:
    schedulers: Sequence[str] = ()          # RouteService addresses; empty: static routes only
    listen: str = "127.0.0.1:8001"          # Triton's gRPC port: clients find the mesh where they expect a server
    metrics_listen: str | None = None       # HOST:PORT for GET /metrics; None: no metrics endpoint
    # Server limits, with their reasons: protos/limits.py (as the runtime's).
    max_message_bytes: int = limits.DATA_PLANE_MAX_MESSAGE_BYTES
    max_streams_per_connection: int = limits.DATA_PLANE_MAX_STREAMS_PER_CONNECTION
    routes: RouteTable | None = None        # a static table (tests, --routes-file)
    max_retries: int = 2                    # per call, on top of the first attempt
    channels_per_replica: int = 1           # HTTP/2 connections to each replica
    retry_budget_ratio: float = 0.2         # retries at most ~20 % of recent calls
    tracer_provider: trace.TracerProvider | None = None   # default: the global one (no-op without an SDK)
    # TLS for the front, the replica channels and the route watch (protos/security/tls.py); None: plaintext.
    tls: TlsConfig | None = None
    # Who clients are and which endpoint groups each role may call (protos/security/auth.py, roles.py);
    # None: authentication off / the default groups.
    auth: Authenticator | None = None
    roles: RoleTable | None = None
    # The bearer token this proxy presents to the schedulers it follows (--client-token-file); None: none.
    client_token: str | None = None
    # Calls for a model scaled to zero (proxy/cold_start.py): how long each may wait, how many at once.
    cold_start_timeout_s: float = DEFAULT_MAX_WAIT_S
    max_held_calls: int = DEFAULT_MAX_HELD


class ProxyServer:
    def __init__(self, options: ProxyOptions):
        self.options = options
        self._table: RouteTable | None = None
        self.metrics = ProxyMetrics()
        self.metrics.registry.collectors.append(self._collect)
        self.pool = EndpointPool(options.max_message_bytes, options.channels_per_replica, options.tls)
        self.upstreams = Upstreams(
            table=lambda: self._table, pool=self.pool, balancer=Balancer(),
            budget=RetryBudget(ratio=options.retry_budget_ratio), metrics=self.metrics,
            tracing=ProxyTracing(options.tracer_provider), max_retries=options.max_retries,
        )
        self.health = health.aio.HealthServicer()
        server_limits = replace(limits.DATA_PLANE, max_message_bytes=options.max_message_bytes,
                                max_streams_per_connection=options.max_streams_per_connection,
                                max_pending_requests=FRONT_DOOR_PENDING_REQUESTS)
        auth = AuthInterceptor(options.auth or Authenticator(), options.roles or data_plane_table())
        self.server = grpc_server(interceptors=[StatusInterceptor(), auth],
                                  options=[*server_limits.server_options(), *FRONT_DOOR_QUEUE])
        servicer = ProxyServicer(self.upstreams, has_table=lambda: self._table is not None)
        self.server.add_generic_rpc_handlers((
            service_handler(servicer, UnaryForwarder(self.upstreams), StreamForwarder(self.upstreams)),
        ))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.address = add_port(self.server, options.listen, options.tls)  # ListenError: the port is taken
        self.port = int(self.address.rsplit(":", 1)[1])
        self.metrics_server = MetricsHttpServer(options.metrics_listen, self.metrics.render) \
            if options.metrics_listen else None
        self.follower = RouteFollower(options.schedulers, self.set_routes, tls=options.tls,
                                      token=options.client_token) \
            if options.schedulers else None
        if self.follower is not None:
            self.upstreams.cold_starts = ColdStarts(self.follower.wake, lambda: self._table,
                                                    max_held=options.max_held_calls,
                                                    max_wait_s=options.cold_start_timeout_s)
        self._has_table = asyncio.Event()
        self._background: set[asyncio.Task] = set()

    @property
    def metrics_address(self) -> str | None:
        return self.metrics_server.address if self.metrics_server else None

    @property
    def routes(self) -> RouteTable | None:
        return self._table

    def set_routes(self, table: RouteTable) -> None:
        """Serve from ``table`` from now on (the follower calls this; tests may too)."""
        self._table = table
        self.pool.update(table)
        if self.upstreams.cold_starts is not None:
            self.upstreams.cold_starts.table_changed()
        if not self._has_table.is_set():
            self._has_table.set()
            task = asyncio.create_task(self._set_health(health_pb2.HealthCheckResponse.SERVING))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def wait_for_routes(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._has_table.wait(), timeout)

    def _collect(self) -> None:
        table = self._table
        self.metrics.table_version.labels().set(table.version if table else 0)
        endpoints = self.pool.all()
        healthy = sum(e.healthy for e in endpoints)
        self.metrics.endpoints.labels("true").set(healthy)
        self.metrics.endpoints.labels("false").set(len(endpoints) - healthy)

    async def start(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.metrics_server:
            await self.metrics_server.start()
        if self.options.routes is not None:
            self.set_routes(self.options.routes)
        if self.follower:
            self.follower.start()

    async def stop(self, grace: float | None = 5.0) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.follower:
            await self.follower.stop()
        await self.server.stop(grace)
        if self.metrics_server:
            await self.metrics_server.stop()
        await self.pool.close()
