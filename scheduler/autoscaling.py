"""Applying the autoscaling policy: sample each autoscaled deployment's load, decide, commit the count.

Load signal: the runtimes report their in-flight and queued calls to their
node agents (``mesh.ReplicaService/WatchLoad``), and the agents carry them in
every usage report (``ReplicaStatus.in_flight``/``queued``). That was chosen
over the proxies reporting what they forward because it counts every caller
(clients that reach replicas directly too), needs no aggregation across
proxies, and rides on reports that already arrive every report interval.

Every ``TICK_S`` the leader samples, per deployment with an ``autoscaling``
section, the summed load of its ready replicas into a window kept in memory
(``stable_window_s`` long), and runs the pure policy
(scheduler/autoscaler.py). A changed count is written to the deployment's
record with the policy's state and the decision's reason, and an event says
why; the reconciler then adds or removes replicas as for ``ctl scale``. The
state is stored only with a change, so a new leader resumes from the last
decision and refills its window from fresh reports.

``wake(deployment)`` (a proxy holding a call for a model scaled to zero) makes
the next tick, which it triggers at once, want a replica.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable

from .autoscaler import AutoscalerState, Decision, Observation, decide
from .cluster import Cluster
from .records import PENDING, READY, DeploymentRecord

log = logging.getLogger(__name__)

TICK_S = 2.0


class Autoscaling:
    def __init__(self, cluster: Cluster, commit: Callable[..., Awaitable[DeploymentRecord]]):
        """``commit(record, **changes)`` writes a deployment record (the store first, then memory)."""
        self.cluster = cluster
        self._commit = commit
        self._windows: dict[str, collections.deque[Observation]] = {}
        self._states: dict[str, AutoscalerState] = {}
        self._demand: set[str] = set()
        self._last_tick = float("-inf")

    def reset(self) -> None:
        """A new term: windows refill from fresh reports; states come back from the records."""
        self._windows.clear()
        self._states.clear()
        self._demand.clear()
        self._last_tick = float("-inf")

    def wake(self, deployment: str) -> str:
        """A call waits for ``deployment`` at a proxy. Returns what the proxy tells its caller."""
        record = self.cluster.deployments.get(deployment)
        if record is None:
            return f"no deployment named {deployment!r}"
        config = record.spec.autoscaling
        if config is None:
            return (f"deployment {deployment!r} has {record.replicas} replica(s) wanted and no autoscaling: "
                    f"scale it up (scheduler ctl scale {deployment} N)")
        self._demand.add(deployment)
        self._last_tick = float("-inf")   # decide on the next pass, not in TICK_S
        return f"deployment {deployment!r} is starting a replica"

    def due(self, now: float) -> bool:
        return now - self._last_tick >= TICK_S

    async def tick(self, now: float) -> bool:
        """Sample and decide for every autoscaled deployment; True if a count changed."""
        self._last_tick = now
        changed = False
        for name in sorted(self.cluster.deployments):
            record = self.cluster.deployments[name]
            config = record.spec.autoscaling
            if config is None:
                self._windows.pop(name, None)
                continue
            window = self._windows.setdefault(name, collections.deque())
            window.append(self._sample(name, now))
            while window and window[0].time < now - config.stable_window_s:
                window.popleft()
            state = self._states.get(name) or AutoscalerState.from_json(record.autoscaler)
            pending = sum(1 for r in self.cluster.replicas_of(name) if r.state == PENDING)
            demand = name in self._demand
            decision, state = decide(list(window), config, now, state, current=record.replicas, pending=pending,
                                     demand=demand)
            self._states[name] = state
            log.debug("deployment %s: %s (window %d samples, last %s)", name, decision.reason, len(window), window[-1])
            if decision.desired > 0 or not demand:
                self._demand.discard(name)
            if decision.desired != record.replicas:
                await self._apply(record, decision, state)
                changed = True
        return changed

    def _sample(self, deployment: str, now: float) -> Observation:
        load, ready = 0, 0
        for replica in self.cluster.replicas_of(deployment):
            if replica.state != READY:
                continue
            ready += 1
            live = self.cluster.live.get(replica.node)
            status = live.replicas.get(replica.id) if live else None
            if status is not None:
                load += status.in_flight
        return Observation(now, float(load), ready)

    async def _apply(self, record: DeploymentRecord, decision: Decision, state: AutoscalerState) -> None:
        text = f"autoscaled {record.replicas} -> {decision.desired}: {decision.reason}"
        await self._commit(record, replicas=decision.desired, autoscaler=state.to_json(), last_scaling=text)
        self.cluster.record_event(f"deployment/{record.name}", text)
        log.info("deployment %s %s", record.name, text)

