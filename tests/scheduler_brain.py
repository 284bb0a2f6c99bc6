"""The scheduler's brain for unit tests: a leading SchedulerCore on a fake clock and a real SQLite store.

No processes: agents are calls on ``SchedulerCore`` (register, report), the
reconciler runs one pass at a time (``settle``), and time moves only when a
test moves it (``clock.now += ...``).
"""

from __future__ import annotations

import asyncio
import contextlib

from mesh_harness import deployment_yaml

from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.scheduler.admin_service import AdminService
from meshserve.scheduler.core import SchedulerCore
from meshserve.scheduler.records import REPLICAS, ReplicaRecord
from meshserve.scheduler.store.sqlite import SqliteStore
from meshserve.scheduler.writer import FencedWriter

HEARTBEAT_TIMEOUT_S = 5.0
GIB = 1 << 30
TEST_TIMEOUT_S = 20.0
# A pass that changes something may enable another (create, then place); more means a loop.
MAX_PASSES = 10


class TrustingVerifier:
    """The brain's tests run no replicas: every claim of an agent is believed (scheduler/verify.py)."""

    async def problem(self, address: str, model: str) -> str:
        return ""


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Brain:
    """A leading SchedulerCore with its admin API, and helpers to act as the agents of fake nodes."""

    def __init__(self, core: SchedulerCore, store: SqliteStore, clock: FakeClock):
        self.core, self.store, self.clock = core, store, clock
        self.admin = AdminService(core, leader_info=None)
        self.ports: dict[str, int] = {}

    async def register(self, node: str) -> None:
        await self.core.register(mesh.Register(node_name=node, host="127.0.0.1", gpu_source="fake",
                                               gpus=_gpus(node), resources=_resources()))

    async def report(self, node: str, **states: str) -> None:
        """``node`` reports; ``states`` maps replica id -> agent state ("ready": with an address)."""
        statuses = [mesh.ReplicaStatus(replica_id=replica_id, state=state,
                                       address=self.address(replica_id) if state == "ready" else "")
                    for replica_id, state in states.items()]
        await self.core.report(node, mesh.UsageReport(gpus=_gpus(node), resources=_resources(), replicas=statuses))

    def address(self, replica_id: str) -> str:
        return f"127.0.0.1:{self.ports.setdefault(replica_id, 20000 + len(self.ports))}"

    async def settle(self) -> None:
        for _ in range(MAX_PASSES):
            if not await self.core.reconciler.reconcile_once():
                return
        raise AssertionError("the reconciler never settled")

    async def apply(self, spec_yaml: str) -> None:
        await self.admin.Apply(mesh.ApplyRequest(spec_yaml=spec_yaml), None)
        await self.settle()

    def replicas(self, state: str | None = None) -> list[ReplicaRecord]:
        return sorted((r for r in self.core.cluster.replicas.values() if state in (None, r.state)),
                      key=lambda r: r.id)

    def on(self, node: str) -> list[ReplicaRecord]:
        return self.core.cluster.replicas_on(node)

    def routed(self, model: str = "add_sub") -> set[str]:
        return {e.address for route in self.core.route_table().routes if route.model == model
                for e in route.endpoints}

    async def stored_replica_ids(self) -> set[str]:
        items, _ = await self.store.range(REPLICAS)
        return {ReplicaRecord.from_json(item.value).id for item in items}


def _gpus(node: str) -> list[mesh.GpuInfo]:
    return [mesh.GpuInfo(index=i, uuid=f"{node}-gpu{i}", memory_total_bytes=80 * GIB, memory_free_bytes=80 * GIB)
            for i in range(2)]


def _resources() -> mesh.HostResources:
    return mesh.HostResources(cpu_cores=8, memory_total_bytes=64 * GIB, memory_available_bytes=64 * GIB)


@contextlib.asynccontextmanager
async def brain(tmp_path):
    store = await SqliteStore.open(str(tmp_path / "state.db"))
    clock = FakeClock()
    core = SchedulerCore(FencedWriter(store, lambda: None), scheduler_id="test",
                         heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, clock=clock, verifier=TrustingVerifier())
    await core.cluster.load(store)
    core.leading = True  # as start_leading does, without its background loop: the test runs each pass
    try:
        yield Brain(core, store, clock)
    finally:
        await store.close()


def run(test):
    asyncio.run(asyncio.wait_for(test, TEST_TIMEOUT_S))


async def two_ready_replicas_on_two_nodes(b: Brain) -> tuple[ReplicaRecord, ReplicaRecord]:
    """node-a and node-b each run one ready replica of "adder" (add_sub)."""
    for node in ("node-a", "node-b"):
        await b.register(node)
    await b.apply(deployment_yaml("adder", replicas=2))
    [on_a], [on_b] = b.on("node-a"), b.on("node-b")
    await b.report("node-a", **{on_a.id: "ready"})
    await b.report("node-b", **{on_b.id: "ready"})
    await b.settle()
    assert b.routed() == {b.address(on_a.id), b.address(on_b.id)}
    return on_a, on_b


async def lose_node_a(b: Brain, on_b: ReplicaRecord) -> ReplicaRecord:
    """node-a falls silent past the heartbeat timeout while node-b keeps reporting; the replacement."""
    b.clock.now += HEARTBEAT_TIMEOUT_S + 1
    await b.report("node-b", **{on_b.id: "ready"})
    await b.settle()
    assert b.core.node_is_lost("node-a")
    [replacement] = [r for r in b.on("node-b") if r.id != on_b.id]
    return replacement
