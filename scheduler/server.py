"""``scheduler serve``: the scheduler process — store, election, gRPC services, reconcile loop.

Guarantees:
- Several schedulers may run against one etcd: exactly one leads (the
  election key), the others serve Leader/Get and refuse changes and agents
  with FAILED_PRECONDITION naming the leader. When the leader dies, a
  standby takes over within about one election TTL, reloads the state from
  the store and reconciles; nothing is lost or duplicated.
- Every write of the leader is fenced by the election key's create
  revision (scheduler/writer.py).
- A scheduler that stops leading (its lease lost after a pause or a store
  outage, or a fenced write refused) ends every agent stream and route watch
  at once, naming the new leader when it can learn it within
  ``LEADER_LOOKUP_TIMEOUT_S``, then campaigns again as a standby.
- Clients (agents, proxies) may ping their streams (gRPC keepalive) as often
  as every ``MIN_CLIENT_PING_INTERVAL_MS``, so they notice a silent scheduler.
- The store's cluster id (scheduler/store/identity.py) is created once and
  sent to every agent; a corrupt SQLite store is refused at start
  (``CorruptStore``: ``scheduler serve`` exits 1 saying so).
- SIGTERM resigns leadership (a standby takes over at once), closes agent
  streams and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

from meshserve.common import limits
from meshserve.common.leader import leader_hint
from meshserve.common.listen import grpc_server
from meshserve.common.metrics import render
from meshserve.common.metrics_http import MetricsHttpServer
from meshserve.common.ready_line import metrics_detail, print_ready_line_until_signalled
from meshserve.common.sd_notify import Notifier, announce, draining
from meshserve.common.security.auth import Authenticator, AuthInterceptor
from meshserve.common.security.roles import control_plane_table
from meshserve.common.security.tls import TlsConfig, add_port
from meshserve.common.status_interceptor import StatusInterceptor
from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc

from .admin_service import AdminService
from .agent_service import AgentService
from .artifact_service import ArtifactService
from .artifacts import DEFAULT_ARTIFACT_DIR, DEFAULT_MAX_BUNDLE_BYTES, BlobStore
from .audit import AuditLog
from .core import DEFAULT_HEARTBEAT_TIMEOUT_S, DEFAULT_REPORT_INTERVAL_S, SchedulerCore
from .election import Election
from .metrics import SchedulerMetrics, TimedStore
from .route_service import RouteService
from .status_line import scheduler_status
from .store import CorruptStore, Store, StoreError, open_store
from .store.etcd_security import EtcdSecurity
from .store.identity import ensure_cluster_id
from .verify import GrpcReplicaVerifier
from .writer import FencedWriter

log = logging.getLogger(__name__)

ELECTION_NAME = "scheduler"
# A step-down asks the store who leads now for at most this long, so the
# streams it ends can name the new leader; a store that is down costs no more.
LEADER_LOOKUP_TIMEOUT_S = 1.0
# While the store is unreachable at start, try it again this often.
STORE_RETRY_S = 1.0
# How often a starting scheduler asks whether it leads or who does, until one of them is known.
ROLE_POLL_S = 0.2
# Agents and proxies ping their long-lived streams every few seconds to notice
# a paused or partitioned scheduler (node_agent/agent.py KEEPALIVE_*). gRPC
# servers refuse pings more often than every 5 min on a stream with no data
# sent back (and then close the connection); the scheduler sends agents
# nothing for long stretches, so allow a ping per second; pinging faster is struck (protos/limits.py).
MIN_CLIENT_PING_INTERVAL_MS = limits.CONTROL_PLANE_MIN_PING_INTERVAL_MS
SERVER_OPTIONS = limits.CONTROL_PLANE.server_options()


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
    # Who callers are (protos/security/auth.py); None: authentication off, every caller allowed.
    auth: Authenticator | None = None
    # Audit lines of mutating admin calls go here (JSON lines); None: the log, logger meshserve.audit.
    audit_log: str | None = None
    # HOST:PORT for Prometheus GET /metrics (scheduler/metrics.py); None: no metrics endpoint.
    metrics_listen: str | None = None
    # Uploaded model bundles by content digest (scheduler/artifacts.py), and the largest accepted.
    artifact_dir: str = DEFAULT_ARTIFACT_DIR
    max_artifact_bytes: int = DEFAULT_MAX_BUNDLE_BYTES


class SchedulerServer:
    def __init__(self, options: SchedulerOptions):
        self.options = options
        self.auth = options.auth or Authenticator()
        self.audit = AuditLog(options.audit_log)
        self.server = grpc_server(
            interceptors=[StatusInterceptor(), AuthInterceptor(self.auth, control_plane_table(), self.audit)],
            options=SERVER_OPTIONS)
        self.address = add_port(self.server, options.listen, options.tls)  # ListenError: the port is taken
        self.port = int(self.address.rsplit(":", 1)[1])
        self.scheduler_id = options.scheduler_id or f"{socket.gethostname()}:{self.port}"
        self.store: Store | None = None
        self.election: Election | None = None
        self.core: SchedulerCore | None = None
        self._leadership: asyncio.Task | None = None
        self.metrics = SchedulerMetrics(lambda: self.core)
        self.metrics_server = (MetricsHttpServer(options.metrics_listen, lambda: render(self.metrics.registry))
                               if options.metrics_listen else None)   # ListenError: the port is taken

    @property
    def metrics_address(self) -> str | None:
        return self.metrics_server.address if self.metrics_server else None

    async def start(self) -> None:
        if self.metrics_server:
            await self.metrics_server.start()   # first: a scheduler waiting for its store says leader 0
        self.store = store = TimedStore(await open_store(self.options.store_url, self.options.etcd_security),
                                        self.metrics)
        cluster_id = await self._cluster_id(store)
        self.election = election = Election(store, ELECTION_NAME, self.scheduler_id, self.address,
                                            self.options.election_ttl_s)
        writer = FencedWriter(store, election.fence)
        self.core = core = SchedulerCore(writer, scheduler_id=self.scheduler_id,
                                         report_interval_s=self.options.report_interval_s,
                                         heartbeat_timeout_s=self.options.heartbeat_timeout_s,
                                         verifier=GrpcReplicaVerifier(self.options.tls))
        self.core.cluster_id = cluster_id
        self.core.observe_reconcile = self.metrics.reconcile_seconds.observe
        mesh_grpc.add_AgentServiceServicer_to_server(AgentService(self.core, self.auth), self.server)
        blobs = BlobStore(self.options.artifact_dir, self.options.max_artifact_bytes)
        mesh_grpc.add_AdminServiceServicer_to_server(AdminService(self.core, self._leader_info, blobs), self.server)
        mesh_grpc.add_ArtifactServiceServicer_to_server(ArtifactService(blobs), self.server)
        mesh_grpc.add_RouteServiceServicer_to_server(RouteService(self.core), self.server)
        await self.server.start()
        self._leadership = asyncio.create_task(self._lead_when_elected(store, election, core), name="leadership")

    async def _cluster_id(self, store: Store) -> str:
        """The store's cluster id; an unreachable store (etcd starting) is waited for, a corrupt one is not."""
        while True:
            try:
                cluster_id = await ensure_cluster_id(store)
            except CorruptStore:
                raise
            except StoreError as exc:
                log.warning("store %s: reading the cluster id: %s; retrying", self.options.store_url, exc)
                await asyncio.sleep(STORE_RETRY_S)
                continue
            log.info("store %s holds cluster %s", self.options.store_url, cluster_id)
            return cluster_id

    async def _leader_info(self) -> tuple[bool, str, str]:
        if self.core and self.core.leading:
            return True, self.scheduler_id, self.address
        leader = await self.election.leader() if self.election else None
        return False, leader[0] if leader else "", leader[1] if leader else ""

    async def _lead_when_elected(self, store: Store, election: Election, core: SchedulerCore) -> None:
        while True:
            core.leader_hint = await self._leader_hint_now()
            await election.campaign()
            log.info("scheduler %s leads", self.scheduler_id)
            await core.start_leading(store)
            await _first_of(election.lost.wait(), core.deposed.wait())
            log.warning("scheduler %s lost leadership; ending its agent streams and route watches",
                        self.scheduler_id)
            await core.stop_leading(self._leader_hint_now)
            if election.is_leader:
                await election.resign()   # fenced out before the election noticed: drop the lease too

    async def role_known(self) -> str:
        """Once the store answers and this scheduler knows its role: "leader", or "standby (leader ...)"
        (systemd's READY, scheduler/server.py's serve)."""
        while True:
            try:
                leading, leader_id, address = await self._leader_info()
            except StoreError:
                leading, leader_id, address = False, "", ""
            if leading:
                return f"leader; store {self.options.store_url}"
            if leader_id:
                return f"standby; leader {leader_id} at {address}"
            await asyncio.sleep(ROLE_POLL_S)

    async def _leader_hint_now(self) -> str:
        """"ID at ADDRESS" of another leader, or "" when there is none or the store does not answer in time."""
        if self.election is None:   # not started
            return ""
        try:
            async with asyncio.timeout(LEADER_LOOKUP_TIMEOUT_S):
                leader = await self.election.leader()
        except (TimeoutError, StoreError):
            return ""
        if leader is None or leader[0] == self.scheduler_id:
            return ""
        return leader_hint(*leader)

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
        if self.metrics_server:
            await self.metrics_server.stop()
        self.audit.close()


async def _first_of(*waits) -> None:
    """Return when the first of ``waits`` (coroutines) finishes; cancel the others."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def serve(options: SchedulerOptions) -> None:
    server = SchedulerServer(options)
    await server.start()
    # During start the default SIGTERM still ends a scheduler waiting for its store.
    stop = print_ready_line_until_signalled(
        "scheduler", server.address,
        f" (id {server.scheduler_id}, store {options.store_url})" + metrics_detail(server.metrics_address))
    notifier = Notifier()
    systemd = asyncio.create_task(announce(notifier, server.role_known(), lambda: scheduler_status(server.core)),
                                  name="systemd")
    await stop.wait()
    systemd.cancel()
    async with draining(notifier, lambda: "stopping: ending agent streams and route watches, resigning"):
        await server.stop()
