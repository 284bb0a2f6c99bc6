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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import grpc

from protos.backoff import Backoff
from protos.mesh.leader import leader_named
from protos.mesh import control_pb2 as mesh
from protos.mesh import control_pb2_grpc as mesh_grpc
from protos.security.tls import TlsConfig, aio_channel

from .routes import RouteTable

log = logging.getLogger(__name__)

# Reconnect quickly after a scheduler failover, but a scheduler down for
# long is asked at most every 5 s per proxy.
RECONNECT_BACKOFF = Backoff(initial_s=0.2, max_s=5.0)


class RouteFollower:
    def __init__(self, schedulers: Sequence[str], on_table: Callable[[RouteTable], None],
                 backoff: Backoff = RECONNECT_BACKOFF, tls: TlsConfig | None = None):
        if not schedulers:
            raise ValueError("at least one scheduler address is needed")
        self.schedulers = list(schedulers)
        self.on_table = on_table
        self.backoff = backoff
        self.tls = tls          # each watch opens a new channel: it reads the current files
        self.connected_to: str | None = None
        self._task: asyncio.Task | None = None

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
        """Follow one scheduler until its watch ends: (whether it sent a table, the leader it named)."""
        received = False
        async with aio_channel(address, self.tls) as channel:
            call = mesh_grpc.RouteServiceStub(channel).WatchRoutes(mesh.WatchRoutesRequest())
            try:
                async for table in call:
                    if not received:
                        log.info("following routes from scheduler %s", address)
                    received = True
                    self.connected_to = address
                    self.on_table(RouteTable.from_proto(table))
            except grpc.aio.AioRpcError as err:
                leader = leader_named(err.code(), err.details(), await _trailing(call))
                log.log(logging.INFO if received else logging.DEBUG,
                        "route watch on %s ended: %s: %s", address, err.code().name, err.details())
                self.connected_to = None
                return received, leader if leader != address else None
        self.connected_to = None
        return received, None


async def _trailing(call) -> tuple:
    try:
        return tuple(await call.trailing_metadata() or ())
    except Exception:  # noqa: BLE001 - metadata is only a hint
        return ()
