"""``scheduler serve``: the scheduler process — store, election, gRPC services, reconcile loop.

Guarantees:
- Several schedulers may run against one etcd: exactly one leads (the
  election key), the others serve Leader/Get and refuse changes and agents
  with FAILED_PRECONDITION naming the leader. When the leader dies, a
  standby takes over within about one election TTL, reloads the state from
  the store and reconciles; nothing is lost or duplicated.
- Every write of the leader is fenced by the election key's create
  revision (scheduler/writer.py).
- SIGTERM resigns leadership (a standby takes over at once), closes agent
  streams and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from dataclasses import dataclass

import grpc

from protos.mesh import control_pb2_grpc as mesh_grpc
from protos.mesh.leader import leader_hint
from protos.security.tls import TlsConfig, add_port
from runtime.status_interceptor import StatusInterceptor

from .admin_service import AdminService
from .agent_service import AgentService
from .core import DEFAULT_HEARTBEAT_TIMEOUT_S, DEFAULT_REPORT_INTERVAL_S, SchedulerCore
from .election import Election
from .route_service import RouteService
from .store import open_store
from .store.etcd_security import EtcdSecurity
from .writer import FencedWriter

log = logging.getLogger(__name__)

ELECTION_NAME = "scheduler"


@dataclass
class SchedulerOptions:
    listen: str = "127.0.0.1:7070"
    store_url: str = "sqlite:///var/lib/meshserve/state.db"
    scheduler_id: str = ""
    # A standby takes over within about this long after the leader dies.
    election_ttl_s: int = 5
    report_interval_s: float = DEFAULT_REPORT_INTERVAL_S
    heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S
    # TLS for the gRPC services (protos/security/tls.py); None: plaintext on loopback.
    tls: TlsConfig | None = None
    # TLS and user/password auth towards an etcd store.
    etcd_security: EtcdSecurity | None = None


class SchedulerServer:
    def __init__(self, options: SchedulerOptions):
        self.options = options
        self.server = grpc.aio.server(interceptors=[StatusInterceptor()])
        self.port = add_port(self.server, options.listen, options.tls)
        if not self.port:
            raise OSError(f"cannot listen on {options.listen}")
        self.address = f"{options.listen.rsplit(':', 1)[0]}:{self.port}"
        self.scheduler_id = options.scheduler_id or f"{socket.gethostname()}:{self.port}"
        self.store = None
        self.election: Election | None = None
        self.core: SchedulerCore | None = None
        self._leadership: asyncio.Task | None = None

    async def start(self) -> None:
        self.store = await open_store(self.options.store_url, self.options.etcd_security)
        self.election = Election(self.store, ELECTION_NAME, self.scheduler_id, self.address,
                                 self.options.election_ttl_s)
        writer = FencedWriter(self.store, self.election.fence)
        self.core = SchedulerCore(writer, scheduler_id=self.scheduler_id,
                                  report_interval_s=self.options.report_interval_s,
                                  heartbeat_timeout_s=self.options.heartbeat_timeout_s)
        mesh_grpc.add_AgentServiceServicer_to_server(AgentService(self.core), self.server)
        mesh_grpc.add_AdminServiceServicer_to_server(AdminService(self.core, self._leader_info), self.server)
        mesh_grpc.add_RouteServiceServicer_to_server(RouteService(self.core), self.server)
        await self.server.start()
        self._leadership = asyncio.create_task(self._lead_when_elected(), name="leadership")

    async def _leader_info(self) -> tuple[bool, str, str]:
        if self.core and self.core.leading:
            return True, self.scheduler_id, self.address
        leader = await self.election.leader() if self.election else None
        return False, leader[0] if leader else "", leader[1] if leader else ""

    async def _lead_when_elected(self) -> None:
        while True:
            await self._refresh_hint()
            await self.election.campaign()
            log.info("scheduler %s leads", self.scheduler_id)
            await self.core.start_leading(self.store)
            await self.election.lost.wait()
            log.warning("scheduler %s lost leadership", self.scheduler_id)
            await self.core.stop_leading()

    async def _refresh_hint(self) -> None:
        leader = await self.election.leader()
        self.core.leader_hint = leader_hint(*leader) if leader else ""

    async def stop(self) -> None:
        if self._leadership:
            self._leadership.cancel()
            await asyncio.gather(self._leadership, return_exceptions=True)
        if self.core and self.core.leading:
            await self.core.stop_leading()
        if self.election:
            await self.election.resign()
        await self.server.stop(1.0)
        if self.store:
            await self.store.close()


async def serve(options: SchedulerOptions) -> None:
    server = SchedulerServer(options)
    await server.start()
    print(f"meshserve scheduler {server.scheduler_id} listening on {server.address} "
          f"(store {options.store_url})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop()
