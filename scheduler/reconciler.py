"""Desired vs observed: one idempotent pass that converges the replicas on the deployments.

Each pass (``reconcile_once``) reads only the in-memory cluster and writes
only differences through the fenced writer, so running it twice, or after a
crash halfway, is harmless. In order:

1. Nodes whose agents have been silent past the heartbeat timeout are lost;
   their ready replicas become ``lost`` (still routed until replaced), the
   others, and those on drained nodes, go back to pending. Not during the
   lost-node grace (``begin_grace``): a scheduler that has just started
   leading, or has just resumed from a pause, has heard from nobody yet,
   and its agents may still be in their reconnect backoff.
2. Each deployment gets exactly ``replicas`` replicas of its current
   revision. A new revision rolls: one extra replica at a time (surge 1),
   and an old replica is removed only once a new one is ready.
3. Lost replicas go once their deployment's replacements are ready.
4. Pending replicas are placed (scheduler/placing.py); those that fit
   nowhere stay pending with the reason.

How many replicas a deployment has is decided here; where they go is the
placement engine's business.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from .cluster import Cluster
from .placing import place_pending
from .records import (
    DRAINING,
    FAILED,
    LEAVING,
    LOST,
    NODE_LOST,
    NODE_READY,
    PENDING,
    PLACED,
    READY,
    STARTING,
    DeploymentRecord,
    ReplicaRecord,
    new_replica_id,
)
from .rollouts import (
    COMPLETE,
    PROGRESSING,
    ROLLED_BACK,
    ROLLOUT_FAILED,
    failure_of,
    rollback_changes,
    rolling_bounds,
)
from .writer import FencedWriter

log = logging.getLogger(__name__)

WAITING_FOR_PLACEMENT = "waiting for placement"   # a new replica's reason until placement says more
# Which replicas go first when there are too many: those doing nothing useful.
_REMOVAL_ORDER: dict[str, int] = {PENDING: 0, FAILED: 1, PLACED: 2, STARTING: 3, DRAINING: 4, READY: 5}


class Reconciler:
    def __init__(self, cluster: Cluster, writer: FencedWriter, heartbeat_timeout_s: float,
                 lost_grace_s: float = 0.0):
        self.cluster = cluster
        self.writer = writer
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.lost_grace_s = lost_grace_s
        self._grace_until = float("-inf")
        self._stuck_reported: set[tuple[str, int]] = set()

    def begin_grace(self) -> None:
        """No node is declared lost for ``lost_grace_s`` from now (on the cluster's clock)."""
        self._grace_until = self.cluster.clock() + self.lost_grace_s

    async def reconcile_once(self) -> bool:
        """One pass; returns True when it changed anything."""
        changed = await self._mark_lost_nodes()
        changed |= await self.evict_from_unusable_nodes()
        for name in sorted(self.cluster.deployments):
            changed |= await self._converge_deployment(name)
            changed |= await self._retire_lost(name)
        changed |= await self._remove_orphans()
        changed |= await place_pending(self.cluster, self.writer)
        return changed

    async def _mark_lost_nodes(self) -> bool:
        cluster, now, changed = self.cluster, self.cluster.clock(), False
        if now < self._grace_until:
            return False
        for name, node in cluster.nodes.items():
            live = cluster.live.get(name)
            silent_for = now - live.last_report if live else float("inf")
            if node.state == NODE_READY and silent_for > self.heartbeat_timeout_s:
                node.state = NODE_LOST
                await self.writer.put(node)
                cluster.record_event(f"node/{name}", f"lost: no report for {silent_for:.1f}s")
                log.warning("node %s lost (silent for %.1fs)", name, silent_for)
                changed = True
        return changed

    async def evict_from_unusable_nodes(self) -> bool:
        """Replicas on a lost, draining or unknown node: placed again, or kept as stand-ins (lost),
        or forgotten (leaving anyway). Idempotent; True when it changed anything."""
        cluster, changed = self.cluster, False
        for replica in list(cluster.replicas.values()):
            if not replica.node:
                continue
            node = cluster.nodes.get(replica.node)
            why = None
            if node is None:
                why = f"node {replica.node} is unknown"
            elif node.state == NODE_LOST:
                why = f"node {replica.node} was lost"
            elif node.draining:
                why = f"node {replica.node} is draining"
            if why and replica.state in LEAVING:
                if node is None or (node.state == NODE_LOST and replica.state == DRAINING):
                    await self.forget(replica)  # nothing left to drain
                    changed = True
                continue  # a lost one waits for its replacement (_retire_lost)
            if why and node is not None and node.state == NODE_LOST and _routable(replica):
                replica.state, replica.reason = LOST, f"{why}; routed until its replacement is ready"
                await self.writer.put(replica)
                cluster.record_event(f"replica/{replica.id}", f"lost with {replica.node}: routed until replaced")
                changed = True
                continue
            if why:
                previous = replica.node
                leader = cluster.replicas.get(replica.group, replica) if replica.group else replica
                await self._forget_steps(leader)
                if leader.id in cluster.replicas:
                    _reset_to_pending(leader, f"{why}; placing it again")
                    await self.writer.put(leader)
                cluster.record_event(f"replica/{replica.id}", f"evicted from {previous}: {why}")
                changed = True
        return changed

    async def _converge_deployment(self, name: str) -> bool:
        cluster = self.cluster
        deployment = cluster.deployments[name]
        replicas = [r for r in cluster.replicas_of(name) if r.state not in LEAVING and r.leads]
        if deployment.canary_active:
            return await self._converge_canary(deployment, replicas)
        current = [r for r in replicas if r.revision == deployment.revision]
        old = [r for r in replicas if r.revision != deployment.revision]
        desired = deployment.replicas
        rollout = deployment.spec.rollout
        bounds = rolling_bounds(rollout, desired)
        # While old revisions still run, at most max_surge replicas beyond the desired count.
        room = None if not old else max(0, desired + bounds.surge - len(current) - len(old))
        changed = await self._scale_revision(deployment, deployment.revision, current, desired, room)
        current = [r for r in cluster.replicas_of(name)
                   if r.revision == deployment.revision and r.state not in LEAVING and r.leads]

        # Old revisions: drop the ones not serving at once, the serving ones as long as enough stay ready.
        if old:
            ready_new = sum(1 for r in current if r.state == READY)
            serving_old = [r for r in old if r.state == READY]
            for replica in old:
                if replica.state != READY and (current or desired == 0):
                    await self._remove(replica, f"replaced by revision {deployment.revision}")
                    changed = True
            unavailable = bounds.unavailable
            no_room = [r for r in current if r.state == PENDING and r.reason and r.reason != WAITING_FOR_PLACEMENT]
            if no_room and rollout.resource_aware:
                unavailable = max(unavailable, 1)   # replace in place: the old replica's room is the new one's
            elif no_room:
                self._report_stuck(deployment, no_room[0].reason)
            excess = len(serving_old) + ready_new - (desired - unavailable)
            for replica in sorted(serving_old, key=lambda r: r.id)[: max(0, excess)]:
                await self._remove(replica, f"replaced by revision {deployment.revision}")
                changed = True
        changed |= await self._track_rollout(deployment, current, old)
        return changed

    def _report_stuck(self, deployment: DeploymentRecord, why: str) -> None:
        """Once per revision: the rollout waits for room a surge replica cannot get."""
        key = (deployment.name, deployment.revision)
        if key in self._stuck_reported:
            return
        self._stuck_reported.add(key)
        self.cluster.record_event(f"deployment/{deployment.name}",
                                  f"rollout to revision {deployment.revision} stuck: {why} (set rollout.resource_"
                                  f"aware: true to replace replicas in place, or free room)")

    async def _track_rollout(self, deployment: DeploymentRecord, current: list[ReplicaRecord],
                             old: list[ReplicaRecord]) -> bool:
        """Mark the rollout complete, or failed (and roll it back when the spec says so)."""
        if deployment.rollout_state != PROGRESSING:
            return False
        name = deployment.name
        ready_new = sum(1 for r in current if r.state == READY)
        if not old and ready_new >= deployment.replicas:
            await self._commit(deployment, rollout_state=COMPLETE)
            self.cluster.record_event(f"deployment/{name}", f"rollout to revision {deployment.revision} complete")
            return True
        rollout = deployment.spec.rollout
        why = failure_of(rollout, current, deployment.rollout_started_unix_ms, now_ms())
        if why is None:
            return False
        if rollout.auto_rollback and any(e.revision < deployment.revision for e in deployment.history):
            failed = deployment.revision
            changes, target = rollback_changes(deployment)
            await self._commit(deployment, **changes, rollout_state=f"{ROLLED_BACK}: revision {failed}: {why}",
                               rollout_started_unix_ms=now_ms())
            self.cluster.record_event(f"deployment/{name}", f"rollout to revision {failed} failed ({why}); "
                                                            f"rolled back to revision {target}")
        else:
            await self._commit(deployment, rollout_state=f"{ROLLOUT_FAILED}: {why}")
            self.cluster.record_event(f"deployment/{name}", f"rollout to revision {deployment.revision} "
                                                            f"failed: {why}")
        return True

    async def _commit(self, deployment: DeploymentRecord, **changes: Any) -> None:
        updated = dataclasses.replace(deployment, **changes)
        await self.writer.put(updated)
        self.cluster.deployments[updated.name] = updated

    async def _converge_canary(self, deployment: DeploymentRecord, replicas: list[ReplicaRecord]) -> bool:
        """The stable revision at full strength beside the canary's few replicas; nothing else."""
        targets = {deployment.stable_revision: deployment.replicas,
                   deployment.revision: deployment.spec.rollout.canary_replicas}
        changed = False
        for revision, count in targets.items():
            of_revision = [r for r in replicas if r.revision == revision]
            changed |= await self._scale_revision(deployment, revision, of_revision, count, None)
        for replica in replicas:
            if replica.revision not in targets:
                await self._remove(replica, f"neither the stable revision {deployment.stable_revision} "
                                            f"nor the canary {deployment.revision}")
                changed = True
        return changed

    async def _scale_revision(self, deployment: DeploymentRecord, revision: int, replicas: list[ReplicaRecord], count: int,
                              room: int | None) -> bool:
        """Make ``replicas`` (all of ``revision``) number ``count``: remove the least useful
        surplus, or create up to ``room`` new ones (None: as many as missing)."""
        changed = False
        if len(replicas) > count:
            surplus = sorted(replicas, key=lambda r: (_REMOVAL_ORDER.get(r.state, 9), r.id))[: len(replicas) - count]
            for replica in surplus:
                await self._remove(replica, "scaled down")
            changed = True
        missing = count - len(replicas)
        for _ in range(max(0, min(missing, missing if room is None else room))):
            replica = ReplicaRecord(id=new_replica_id(deployment.name), deployment=deployment.name,
                                    revision=revision, reason=WAITING_FOR_PLACEMENT)
            self.cluster.replicas[replica.id] = replica
            await self.writer.put(replica)
            self.cluster.record_event(f"deployment/{deployment.name}",
                                      f"created replica {replica.id} (revision {revision})")
            changed = True
        return changed

    async def _retire_lost(self, name: str) -> bool:
        """Forget the lost replicas of a deployment that are no longer needed as stand-ins: as many
        stay (the first by id) as its in-service replicas that are not ready yet (replacements)."""
        replicas = self.cluster.replicas_of(name)
        lost = [r for r in replicas if r.state == LOST]
        if not lost:
            return False
        waiting = sum(1 for r in replicas if r.state not in LEAVING and r.leads and r.state != READY)
        for replica in lost[waiting:]:
            await self.forget(replica)
            self.cluster.record_event(f"replica/{replica.id}", "replaced: removed from the routes")
            self.cluster.record_event(f"deployment/{name}", f"lost replica {replica.id} replaced")
        return len(lost) > waiting

    async def _remove_orphans(self) -> bool:
        """Replicas whose deployment was deleted, and pipeline steps whose leader is gone."""
        changed = False
        for replica in list(self.cluster.replicas.values()):
            if replica.state == DRAINING:
                continue
            if replica.deployment not in self.cluster.deployments:
                await self._remove(replica, "deployment deleted")
                changed = True
            elif not replica.leads and replica.group not in self.cluster.replicas:
                await self._remove(replica, f"its pipeline replica {replica.group} is gone")
                changed = True
        return changed

    async def _forget_steps(self, leader: ReplicaRecord) -> None:
        """Take a pipeline group's step replicas out of service (the leader is handled apart)."""
        for replica in list(self.cluster.replicas.values()):
            if replica.group == leader.id and replica.id != leader.id:
                await self._remove(replica, f"its pipeline replica {leader.id} is being placed again")

    async def _remove(self, replica: ReplicaRecord, why: str) -> None:
        """Take a replica out of service. One that runs on a live node drains first: it leaves
        the routes and its node's assignments, so the agent stops it gracefully, and its record
        goes when the agent no longer reports it (SchedulerCore). Anything else goes at once."""
        if replica.leads and replica.group:
            await self._forget_steps(replica)
        node = self.cluster.nodes.get(replica.node) if replica.node else None
        if node is not None and node.state != NODE_LOST and replica.state != PENDING:
            replica.state, replica.reason = DRAINING, why
            await self.writer.put(replica)
            self.cluster.record_event(f"replica/{replica.id}", f"draining: {why}")
        else:
            await self.forget(replica)
        self.cluster.record_event(f"deployment/{replica.deployment}", f"removing replica {replica.id}: {why}")

    async def forget(self, replica: ReplicaRecord) -> None:
        self.cluster.replicas.pop(replica.id, None)
        await self.writer.delete(replica)


def _routable(replica: ReplicaRecord) -> bool:
    """A replica the proxies may be sending calls to (a pipeline group is placed again as a whole)."""
    return replica.state == READY and bool(replica.address) and not replica.group


def _reset_to_pending(replica: ReplicaRecord, reason: str) -> None:
    replica.state, replica.reason = PENDING, reason
    replica.node, replica.gpu_indices, replica.address, replica.pid = "", [], "", 0
    replica.models, replica.remote = [], {}


def now_ms() -> int:
    return time.time_ns() // 1_000_000
