"""Following the scheduler's route table: ``mesh.RouteService.WatchRoutes``, forever.

Guarantees:
- Every table received is handed to ``on_table`` whole, in order.
- The last table stays in force while no scheduler answers: the data plane
  never waits on the control plane. A broken watch is re-opened with
  capped backoff until ``stop()``.
- ``--scheduler a,b,c``: tried in turn. A standby refuses with
  FAILED_PRECONDITION (or UNAVAILABLE) naming the leader — in trailing
  metadata ``leader-address`` or as the first HOST:PORT after "leader" in
  its message ("... the leader is ID at HOST:PORT") — and that leader is
  tried next, before the rest of the list.
- A scheduler that goes silent (paused by SIGSTOP, wedged, cut off without
  a reset) is left within ``LIVENESS_INTERVAL_S + LIVENESS_TIMEOUT_S``: while
  a watch is open the follower asks the same connection a cheap question
  (``grpc.health.v1.Health/Check``) every ``LIVENESS_INTERVAL_S``; any
  answer, UNIMPLEMENTED included, proves it alive; no answer within
  ``LIVENESS_TIMEOUT_S`` ends the watch, the silent scheduler goes to the
  end of the list and the others (or the leader one names) are tried.
- Reconnects back off exponentially, jittered and capped (``RECONNECT_BACKOFF``).
- A table from another cluster is never applied: the follower remembers the
  first cluster id it is sent (``RouteTable.cluster_id``, the scheduler's
  store identity) and refuses a scheduler whose store has another one (a
  scheduler started on an empty or wrong store), keeping its last table and
  trying the others, as an agent does (node_agent/membership.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.common.backoff import Backoff
from meshserve.common.errors import Unavailable
from meshserve.common.leader import leader_named
from meshserve.common.security.tls import TlsConfig, aio_channel
from meshserve.common.security.tokens import aio_token_interceptors
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc

from .routes import RouteTable

log = logging.getLogger(__name__)

# Reconnect quickly after a scheduler failover; a scheduler down for long is
# asked at most every 2 s per proxy: capped well below the scheduler's 5 s
# heartbeat timeout, so a restarted leader is found again long before it
# judges anything by a missing report.
RECONNECT_BACKOFF = Backoff(initial_s=0.2, max_s=2.0, jitter=0.5)
# HTTP/2 keepalive pings would need the scheduler's server to allow them
# (gRPC servers answer pings more often than every 5 min on an idle stream
# with GOAWAY "too_many_pings"), and gRPC core may answer a ping while the
# scheduler's event loop is stuck. A health call needs the loop: it proves
# the scheduler itself answers. Once a second costs nothing.
LIVENESS_INTERVAL_S = 1.0
# Long enough for a loaded scheduler (a store write, a GC pause) to answer;
# short enough that a paused leader is left before its standby takes over
# (election TTL 5 s), so the proxy is at the new leader when it starts.
LIVENESS_TIMEOUT_S = 3.0
WAKE_TIMEOUT_S = 5.0


class RouteFollower:
    def __init__(self, schedulers: Sequence[str], on_table: Callable[[RouteTable], None],
                 backoff: Backoff = RECONNECT_BACKOFF, tls: TlsConfig | None = None, token: str | None = None):
        if not schedulers:
            raise ValueError("at least one scheduler address is needed")
        self.schedulers = list(schedulers)
        self.on_table = on_table
        self.backoff = backoff
        self.tls = tls          # each watch opens a new channel: it reads the current files
        self.token = token      # a bearer token for the schedulers; None: the certificate (or nothing)
        self.connected_to: str | None = None
        self.cluster_id = ""             # the first cluster id a scheduler sent; others are refused
        self._task: asyncio.Task | None = None
        self._channel: grpc.aio.Channel | None = None   # to the scheduler whose routes are followed

    async def wake(self, deployment: str) -> str:
        """Ask the scheduler whose routes this follows for a replica of ``deployment`` (scaled to zero)."""
        channel = self._channel
        if channel is None:
            raise Unavailable("no scheduler is connected")
        try:
            response = await mesh_grpc.RouteServiceStub(channel).Wake(mesh.WakeRequest(deployment=deployment),
                                                                      timeout=WAKE_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            raise Unavailable(f"{err.code().name}: {err.details()}") from None
        return response.message

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="route follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        failures = 0
        leader: str | None = None
        while True:
            order = ([leader] if leader else []) + [a for a in self.schedulers if a != leader]
            leader, received_any = None, False
            for address in order:
                received, leader = await self._watch(address)
                received_any = received_any or received
                if leader:
                    break  # follow the named leader first
            failures = 0 if received_any else failures + 1
            # A named leader is tried at once the first time; refusals beyond that back off.
            if failures and not (leader and failures == 1):
                await asyncio.sleep(self.backoff.delay(failures))

    async def _watch(self, address: str) -> tuple[bool, str | None]:
        """Follow one scheduler until its watch ends or it goes silent:
        (whether it sent a table, the leader it named)."""
        async with aio_channel(address, self.tls, interceptors=aio_token_interceptors(self.token)) as channel:
            call = mesh_grpc.RouteServiceStub(channel).WatchRoutes(mesh.WatchRoutesRequest())
            self._channel = channel
            state = _WatchState()
            reader = asyncio.create_task(self._read(address, call, state), name=f"routes from {address}")
            liveness = asyncio.create_task(_until_silent(channel), name=f"liveness of {address}")
            try:
                await asyncio.wait((reader, liveness), return_when=asyncio.FIRST_COMPLETED)
            finally:
                liveness.cancel()
                call.cancel()
                self._channel = None
            self.connected_to = None
            if not reader.done():
                reader.cancel()
                log.warning("scheduler %s did not answer for %.1f s: leaving its route watch",
                            address, LIVENESS_TIMEOUT_S)
                self._demote(address)
                return state.received, None
            leader = reader.result()
            return state.received, leader if leader != address else None

    async def _read(self, address: str, call, state: _WatchState) -> str | None:
        """Hand every table on; when the watch ends, the leader it named (or None)."""
        try:
            async for table in call:
                if not self._same_cluster(address, table.cluster_id):
                    self._demote(address)
                    return None
                if not state.received:
                    log.info("following routes from scheduler %s", address)
                state.received = True
                self.connected_to = address
                self.on_table(RouteTable.from_proto(table))
        except grpc.aio.AioRpcError as err:
            log.log(logging.INFO if state.received else logging.DEBUG,
                    "route watch on %s ended: %s: %s", address, err.code().name, err.details())
            return leader_named(err.code(), err.details() or "", await _trailing(call))
        return None

    def _same_cluster(self, address: str, cluster_id: str) -> bool:
        """Whether a table with ``cluster_id`` may be applied; the first id seen is adopted.
        An empty id (a scheduler from before cluster ids) is accepted, as agents do."""
        if not cluster_id or cluster_id == self.cluster_id:
            return True
        if not self.cluster_id:
            self.cluster_id = cluster_id
            log.info("routes belong to cluster %s", cluster_id)
            return True
        log.error("scheduler %s serves cluster %s, not %s (a wrong or empty store?): its routes are refused, "
                  "the last table stays in force", address, cluster_id, self.cluster_id)
        return False

    def _demote(self, address: str) -> None:
        """Try a silent scheduler last from now on."""
        if address in self.schedulers:
            self.schedulers.remove(address)
            self.schedulers.append(address)


@dataclass
class _WatchState:
    received: bool = False


async def _until_silent(channel: grpc.aio.Channel) -> None:
    """Return once the scheduler behind ``channel`` leaves a liveness check unanswered.

    Any answer proves it alive (it may not serve grpc.health.v1: UNIMPLEMENTED);
    a broken connection (UNAVAILABLE) ends the watch itself, so only
    DEADLINE_EXCEEDED counts as silence."""
    stub: Any = health_pb2_grpc.HealthStub(channel)   # Any: the health stubs declare no methods on it
    check = stub.Check
    while True:
        try:
            await check(health_pb2.HealthCheckRequest(), timeout=LIVENESS_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return
        await asyncio.sleep(LIVENESS_INTERVAL_S)


async def _trailing(call) -> tuple:
    try:
        return tuple(await call.trailing_metadata() or ())
    except Exception:  # noqa: BLE001 - metadata is only a hint
        return ()
