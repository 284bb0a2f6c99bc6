"""Assembling and running a runtime server: gRPC, health, signals, drain.

Lifecycle guarantees:
- The server listens (live) while models load; ServerReady and the health
  service say SERVING only once loading is done.
- SIGTERM or SIGINT drains: health goes NOT_SERVING and ServerReady false
  while requests are still served for ``drain_delay_s`` (so health checkers
  and load balancers route away first), then the server stops taking new
  RPCs, in-flight and queued requests finish (up to the grace period),
  models close, and the process exits 0. It exits as soon as no inference
  call is left: open health Watch streams do not hold it for the grace
  period (runtime/in_flight.py).
- With ``strict``, a model that fails to load stops the server cleanly and
  the process exits 1.
- Health is SERVING only while the server is ready AND serves at least one
  model: a runtime whose models were all unloaded (or failed) says
  NOT_SERVING, so the proxy and the node agent notice.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshserve.common import limits
from meshserve.common.listen import grpc_server
from meshserve.common.metrics import render
from meshserve.common.metrics_http import MetricsHttpServer
from meshserve.common.ready_line import metrics_detail, print_ready_line_until_signalled
from meshserve.common.security.auth import Authenticator, AuthInterceptor
from meshserve.common.security.roles import RoleTable, data_plane_table
from meshserve.common.security.tls import TlsConfig, add_port
from meshserve.common.status_interceptor import StatusInterceptor
from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc
from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc

from .heap_trim import HeapTrimmer
from .load_service import LoadServicer
from .metrics import runtime_registry
from .model import ServedModel
from .model_control import NONE, ModelControl
from .repository import ModelRepository
from .servicer import InferenceServicer
from .shared_memory import SYSTEM, SharedMemoryRegistry
from .shared_memory_janitor import SharedMemoryJanitor

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


@dataclass
class ServerOptions:
    repository: str
    models: list[str] | None = None
    listen: str = "127.0.0.1:8001"
    # Server limits, with their reasons: protos/limits.py.
    max_message_bytes: int = limits.DATA_PLANE_MAX_MESSAGE_BYTES
    max_streams_per_connection: int = limits.DATA_PLANE_MAX_STREAMS_PER_CONNECTION
    # Long enough for a GPU batch in flight to finish; systemd's stop timeout must exceed it.
    grace_period_s: float = 30.0
    # 0 by default: a standalone replica has nobody to tell. Behind a load balancer
    # set it to a little more than the balancer's health-check interval.
    drain_delay_s: float = 0.0
    strict: bool = False
    # Step models of ensembles served by other replicas: name -> HOST:PORT (--remote-model).
    remote_models: dict[str, str] | None = None
    # RepositoryModelLoad/Unload: refused unless "explicit" (runtime/model_control.py).
    model_control: str = NONE
    # TLS for the server and the --remote-model channels (protos/security/tls.py); None: plaintext on loopback.
    tls: TlsConfig | None = None
    # Who callers are and which endpoint groups each role may call (protos/security/auth.py, roles.py);
    # None: authentication off / the default groups.
    auth: Authenticator | None = None
    roles: RoleTable | None = None
    # System shared memory: "system" (Triton's default) or "none" (runtime/shared_memory.py MODES).
    shared_memory: str = SYSTEM
    # HOST:PORT for Prometheus GET /metrics (runtime/metrics.py); None: no metrics endpoint.
    metrics_listen: str | None = None


class RuntimeServer:
    """A runtime replica: one repository served over gRPC."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.repository = ModelRepository(options.repository, options.models, options.remote_models, options.tls)
        control = ModelControl(options.model_control, frozenset(options.models) if options.models else None)
        self.servicer = InferenceServicer(self.repository, control, on_models_changed=self._refresh_health,
                                          shared_memory=SharedMemoryRegistry(enabled=options.shared_memory == SYSTEM))
        self.heap_trimmer = HeapTrimmer()  # refused and finished large requests leave no resident memory
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        server_limits = replace(limits.DATA_PLANE, max_message_bytes=options.max_message_bytes,
                                max_streams_per_connection=options.max_streams_per_connection)
        auth = AuthInterceptor(options.auth or Authenticator(), options.roles or data_plane_table())
        self.server = grpc_server(interceptors=[StatusInterceptor(), auth], options=server_limits.server_options())
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        mesh_grpc.add_ReplicaServiceServicer_to_server(LoadServicer(self._load), self.server)
        self.address = add_port(self.server, options.listen, options.tls)  # ListenError: the port is taken
        self.port = int(self.address.rsplit(":", 1)[1])
        self.shared_memory_janitor = SharedMemoryJanitor(self.servicer.shared_memory, self.port)
        self.metrics_registry = runtime_registry(self.repository.ready_models)
        self.metrics_server = (MetricsHttpServer(options.metrics_listen, lambda: render(self.metrics_registry))
                               if options.metrics_listen else None)   # ListenError: the port is taken

    @property
    def metrics_address(self) -> str | None:
        return self.metrics_server.address if self.metrics_server else None

    def _load(self) -> tuple[int, int]:
        """(inference calls in progress, of which queued in a batcher) for ReplicaService/WatchLoad."""
        queued = sum(model.queued for model in self.repository.ready_models() if isinstance(model, ServedModel))
        return self.servicer.in_flight.count, queued   # an ensemble queues nothing itself: its steps do

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            result = self.health.set(service, status)
            if asyncio.iscoroutine(result):
                await result

    async def _refresh_health(self) -> None:
        """SERVING while ready and serving at least one model: unloading the last one is an outage."""
        serving = self.servicer.ready and bool(self.repository.ready_models())
        await self._set_health(health_pb2.HealthCheckResponse.SERVING if serving
                               else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def start(self) -> None:
        await self.server.start()
        if self.metrics_server:
            await self.metrics_server.start()
        self.heap_trimmer.start()
        self.shared_memory_janitor.start()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.repository.load_all()
        failed = [(name, reason) for name, _, state, reason in self.repository.index() if state != "READY"]
        for name, reason in failed:
            log.warning("model '%s' is not available: %s", name, reason)
        if failed and self.options.strict:
            await self.server.stop(0)
            if self.metrics_server:
                await self.metrics_server.stop()
            await self.heap_trimmer.stop()
            await self.shared_memory_janitor.stop()
            await self.repository.close()
            raise SystemExit(f"--strict: {len(failed)} model(s) failed to load: "
                             + "; ".join(f"{name}: {reason}" for name, reason in failed))
        self.servicer.ready = True
        await self._refresh_health()

    async def drain(self) -> None:
        log.info("draining: no new requests; waiting for in-flight ones")
        self.servicer.ready = False
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.options.drain_delay_s > 0:
            await asyncio.sleep(self.options.drain_delay_s)  # a deliberate pause: still serving
        # New calls are refused from here (UNAVAILABLE: a proxy retries them elsewhere); inference in
        # progress finishes. The grace period is a ceiling, not a wait: once no inference call is left,
        # what remains open (health Watch streams of proxies and agents) is ended at once.
        stopping = asyncio.create_task(self.server.stop(self.options.grace_period_s))
        if not await self.servicer.in_flight.wait_idle(self.options.grace_period_s):
            log.warning("grace period of %.0fs over: cancelling %d call(s) still in progress",
                        self.options.grace_period_s, self.servicer.in_flight.count)
        await self.server.stop(0)
        await stopping
        await self.heap_trimmer.stop()
        await self.shared_memory_janitor.stop()
        self.servicer.shared_memory.close()
        await self.repository.close()
        if self.metrics_server:
            await self.metrics_server.stop()


async def run(options: ServerOptions) -> None:
    server = RuntimeServer(options)
    await server.start()
    stop = print_ready_line_until_signalled("runtime", server.address, metrics_detail(server.metrics_address))
    await stop.wait()
    await server.drain()
    log.info("stopped")
