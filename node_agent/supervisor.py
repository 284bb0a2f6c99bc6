"""Reconciles the replica processes of this node against the scheduler's latest assignments.

``Supervisor.apply(specs)`` is level-triggered and idempotent: given the
complete set of replicas the node should run, it starts the missing ones,
leaves unchanged ones alone (same id and same spec: never a second process),
replaces changed ones (the old process drains first) and drains the ones no
longer assigned. It returns at once; the work happens in one task per replica
(see ``replica.Replica``), and ``wait_for`` awaits any observable change
without polling.

Stopped replicas stay in ``statuses()`` until ``forget_stopped`` drops them,
so the agent can report each stop at least once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable

from .gpu_probe import GpuLoad
from .process import Clock, Launcher, SubprocessLauncher, SystemClock
from .replica import STOPPED, Replica, ReplicaOptions, ReplicaSpec, ReplicaStatus, WaitReady, wait_serving

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, options: ReplicaOptions | None = None, *, launcher: Launcher | None = None,
                 clock: Clock | None = None, wait_ready: WaitReady | None = None):
        self.options = options or ReplicaOptions()
        # Health checks of replicas speak the agent's TLS (the replicas serve with it).
        wait_ready = wait_ready or functools.partial(wait_serving, tls=self.options.tls)
        self._launcher = launcher or SubprocessLauncher()
        self._clock = clock or SystemClock()
        self._wait_ready = wait_ready
        self._replicas: dict[str, Replica] = {}
        self._changed = asyncio.Event()
        self._closed = False

    # -- observed ----------------------------------------------------------

    def statuses(self) -> list[ReplicaStatus]:
        """Every replica this supervisor knows, stopped ones not yet forgotten included, by id."""
        return [self._replicas[key].status for key in sorted(self._replicas)]

    def running(self) -> list[ReplicaStatus]:
        """The replicas not stopped: what a reconnecting agent tells the scheduler it still runs."""
        return [status for status in self.statuses() if status.state != STOPPED]

    def status(self, replica_id: str) -> ReplicaStatus | None:
        replica = self._replicas.get(replica_id)
        return None if replica is None else replica.status

    def gpu_loads(self) -> list[GpuLoad]:
        """Declared GPU memory of every live replica process (what a ``FakeProbe`` accounts)."""
        return [load for replica in self._replicas.values() if (load := replica.load()) is not None]

    def forget_stopped(self, replica_ids: Iterable[str] | None = None) -> None:
        """Drop stopped replicas (those among ``replica_ids``, or all)."""
        for key in list(self._replicas if replica_ids is None else replica_ids):
            replica = self._replicas.get(key)
            if replica is not None and replica.status.state == STOPPED:
                del self._replicas[key]

    async def wait_for(self, predicate: Callable[[list[ReplicaStatus]], object], timeout: float) -> list[ReplicaStatus]:
        """Await until ``predicate(statuses())`` is true; ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while True:
                statuses = self.statuses()
                if predicate(statuses):
                    return statuses
                await self._changed.wait()

    def _notify(self) -> None:
        # Wake every waiter on the current event, then arm a fresh one for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    # -- commands ----------------------------------------------------------

    def apply(self, specs: Iterable[ReplicaSpec]) -> None:
        """Converge on exactly ``specs`` (the node's complete assignment)."""
        if self._closed:
            log.warning("supervisor is draining; ignoring assignments")
            return
        wanted: dict[str, ReplicaSpec] = {}
        for spec in specs:
            if spec.replica_id in wanted:
                log.warning("replica %s assigned twice; using the last", spec.replica_id)
            wanted[spec.replica_id] = spec
        for key, replica in self._replicas.items():
            if key not in wanted and not replica.stopping:
                log.info("replica %s: no longer assigned", key)
                replica.request_stop()
        for key, spec in wanted.items():
            current = self._replicas.get(key)
            if current is not None and not current.stopping and current.spec == spec:
                continue
            if current is not None and not current.stopping:
                log.info("replica %s: assignment changed (revision %d -> %d); replacing", key,
                         current.spec.revision, spec.revision)
                current.request_stop()
            self._start(spec, predecessor=current)
        self._notify()

    def _start(self, spec: ReplicaSpec, predecessor: Replica | None) -> None:
        replica = Replica(spec, self.options, launcher=self._launcher, clock=self._clock,
                          wait_ready=self._wait_ready, on_change=self._notify, predecessor=predecessor)
        self._replicas[spec.replica_id] = replica
        replica.start()

    async def drain_all(self) -> None:
        """Drain every replica and wait until all have stopped; later ``apply`` calls are ignored."""
        if not self._closed:
            self.apply(())
            self._closed = True
        await asyncio.gather(*(replica.finished() for replica in list(self._replicas.values())))
