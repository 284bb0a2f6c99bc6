"""The scheduler's in-memory picture: desired and observed state, and live node usage.

Records mirror the store (the store is the truth after a restart); live
usage comes only from agent reports and is never written. Everything here
runs on the scheduler's event loop, so no locks are needed.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from meshserve.protos.mesh import control_pb2 as mesh

from .records import DEPLOYMENTS, NODE_LOST, NODES, READY, REPLICAS, DeploymentRecord, NodeRecord, ReplicaRecord
from .store import Store

EVENTS_KEPT = 50  # per object, for `describe`


@dataclass
class LiveNode:
    """What the latest reports of a connected agent said."""

    gpus: list[mesh.GpuInfo] = field(default_factory=list)
    resources: mesh.HostResources = field(default_factory=mesh.HostResources)
    replicas: dict[str, mesh.ReplicaStatus] = field(default_factory=dict)
    last_report: float = 0.0          # time.monotonic() of the last message
    connected: bool = False


class Cluster:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.deployments: dict[str, DeploymentRecord] = {}
        self.replicas: dict[str, ReplicaRecord] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.live: dict[str, LiveNode] = {}
        self.placements = 0   # replicas placed on a node by this process (scheduler/metrics.py)
        self.events: dict[str, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=EVENTS_KEPT))

    async def load(self, store: Store) -> None:
        """Read desired and observed state back from the store (after a start or a takeover)."""
        deployments, _ = await store.range(DEPLOYMENTS)
        replicas, _ = await store.range(REPLICAS)
        nodes, _ = await store.range(NODES)
        self.deployments = {d.name: d for d in (DeploymentRecord.from_json(item.value) for item in deployments)}
        self.replicas = {r.id: r for r in (ReplicaRecord.from_json(item.value) for item in replicas)}
        self.nodes = {n.name: n for n in (NodeRecord.from_json(item.value) for item in nodes)}
        # Nobody has reported yet: give every known node a full heartbeat period from now.
        now = self.clock()
        self.live = {name: LiveNode(last_report=now) for name in self.nodes}

    def record_event(self, subject: str, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.events[subject].append(f"{stamp} {text}")

    def replicas_of(self, deployment: str) -> list[ReplicaRecord]:
        return sorted((r for r in self.replicas.values() if r.deployment == deployment), key=lambda r: r.id)

    def ready_count(self, deployment: str) -> int:
        """Ready replicas of ``deployment``, of any revision: what `get`, `describe` and `explain` all show
        as ready (the one definition), and what a rollout keeps serving."""
        return sum(1 for r in self.replicas.values() if r.deployment == deployment and r.state == READY)

    def replicas_on(self, node: str) -> list[ReplicaRecord]:
        return sorted((r for r in self.replicas.values() if r.node == node), key=lambda r: r.id)

    def node_usable(self, name: str) -> bool:
        node = self.nodes.get(name)
        return bool(node and node.state != NODE_LOST and not node.cordoned and not node.draining)
