"""A new or restarted leader gives agents a grace period before it declares any node lost (issue 8 item 2).

Unit: the reconciler on a fake clock over a real SQLite store. Integration: ``kill -9`` of the only
scheduler (SQLite), agents back off to their longest reconnect delay, the scheduler comes back on the
same port: no node is declared lost, no replica is restarted (same pids).
"""

from __future__ import annotations

import asyncio
import re
import time

from mesh_harness import (
    CONVERGE_TIMEOUT_S,
    ELECTION_TTL_S,
    HEARTBEAT_TIMEOUT_S,
    REPORT_INTERVAL_S,
    Admin,
    Mesh,
    Process,
    deployment_yaml,
)

from meshserve.scheduler.cluster import Cluster, LiveNode
from meshserve.scheduler.core import LOST_GRACE_HEARTBEATS
from meshserve.scheduler.reconciler import Reconciler
from meshserve.scheduler.records import NODE_LOST, NODE_READY, NodeRecord
from meshserve.scheduler.store.sqlite import SqliteStore
from meshserve.scheduler.writer import FencedWriter

HEARTBEAT_S = 5.0
GRACE_S = 15.0


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_new_leader_declares_no_node_lost_before_its_grace_ends(tmp_path):
    async def main():
        store = await SqliteStore.open(str(tmp_path / "state.db"))
        writer = FencedWriter(store, lambda: None)
        for name in ("quiet", "talking"):
            await writer.put(NodeRecord(name=name, state=NODE_READY))
        clock = FakeClock()
        cluster = Cluster(clock=clock)
        await cluster.load(store)                      # a restarted leader: nobody has reported yet
        reconciler = Reconciler(cluster, writer, HEARTBEAT_S, lost_grace_s=GRACE_S)
        reconciler.begin_grace()
        try:
            clock.now += HEARTBEAT_S * 2                # past one heartbeat timeout, inside the grace
            await reconciler.reconcile_once()
            assert {n.name: n.state for n in cluster.nodes.values()} == {"quiet": NODE_READY, "talking": NODE_READY}

            clock.now += GRACE_S - HEARTBEAT_S * 2 - 1  # still inside; "talking" reports now
            cluster.live["talking"] = LiveNode(connected=True, last_report=clock.now)
            await reconciler.reconcile_once()
            assert cluster.nodes["quiet"].state == NODE_READY

            clock.now += 2                              # the grace is over: silence counts again
            await reconciler.reconcile_once()
            assert cluster.nodes["quiet"].state == NODE_LOST
            assert cluster.nodes["talking"].state == NODE_READY
            kv = await store.get(cluster.nodes["quiet"].key)
            assert b'"lost"' in kv.value                  # written, not only in memory

            clock.now += HEARTBEAT_S + 1                  # and after the grace, the heartbeat rule as before
            await reconciler.reconcile_once()
            assert cluster.nodes["talking"].state == NODE_LOST
        finally:
            await store.close()

    asyncio.run(asyncio.wait_for(main(), 20))


# --- integration ------------------------------------------------------------------------------

# The old agents' backoff reached 6.4 s after this many failed rounds, then 10 s; today's agents stay at
# most 2 s apart. Waiting for it makes the test wait "until the agents' backoff is long".
FAILED_ROUNDS = 7
_RECONNECTING = re.compile(r"reconnecting in (\d+\.\d+)s")


def reconnect_delays(agent: Process, after: int) -> list[float]:
    return [float(m.group(1)) for line in agent.output[after:] if (m := _RECONNECTING.search(line))]


def restart_scheduler(cluster: Mesh, store_url: str, port: str) -> Process:
    """The same scheduler again on the same port, as a supervisor would restart it."""
    process = Process("scheduler-s1-restarted", [
        "-m", "meshserve.scheduler", "serve", "--listen", f"127.0.0.1:{port}", "--store", store_url, "--id", "s1",
        "--report-interval", str(REPORT_INTERVAL_S), "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S),
        "--election-ttl", str(ELECTION_TTL_S)])
    cluster.processes.append(process)
    process.wait_listening()
    return process


def ready(admin: Admin, count: int):
    replicas = admin.replicas("adder")
    return replicas if len(replicas) == count and all(r.state == "ready" for r in replicas) else None


def test_a_restarted_scheduler_loses_no_node_while_agents_back_off(tmp_path):
    cluster = Mesh()
    try:
        store = f"sqlite:///{tmp_path / 'state.db'}"
        scheduler = cluster.scheduler(store, "s1")
        agents = [cluster.agent(name, scheduler.address) for name in ("node-a", "node-b")]
        admin = Admin(scheduler.address)
        admin.wait_for(lambda: len([n for n in admin.nodes() if n.state == "ready"]) == 2, "2 nodes", mesh_=cluster)
        admin.apply(deployment_yaml("adder", replicas=2))
        before = admin.wait_for(lambda: ready(admin, 2), "2 ready replicas", mesh_=cluster)
        assert {r.node for r in before} == {"node-a", "node-b"}
        admin.close()

        marks = [len(agent.output) for agent in agents]
        scheduler.kill_host()                                     # kill -9
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S
        while not all(len(reconnect_delays(a, m)) >= FAILED_ROUNDS for a, m in zip(agents, marks, strict=True)):
            assert time.monotonic() < deadline, f"agents did not back off\n{cluster.logs()}"
            time.sleep(0.1)                                      # polling other processes' logs
        longest = max(max(reconnect_delays(a, m)) for a, m in zip(agents, marks, strict=True))

        restarted = restart_scheduler(cluster, store, scheduler.address.rsplit(":", 1)[1])
        admin = Admin(restarted.address)
        admin.wait_for(lambda: admin.leader().is_leader, "the restarted scheduler to lead", mesh_=cluster)
        led_at = time.monotonic()
        # Nothing may happen for the whole grace and a heartbeat timeout after it: watch it throughout.
        quiet_until = led_at + LOST_GRACE_HEARTBEATS * HEARTBEAT_TIMEOUT_S + HEARTBEAT_TIMEOUT_S
        expected = {(r.id, r.node, r.pid, r.address) for r in before}
        while time.monotonic() < quiet_until:
            nodes = {n.name: n.state for n in admin.nodes()}
            assert nodes == {"node-a": "ready", "node-b": "ready"}, f"{nodes}\n{cluster.logs()}"
            replicas = admin.replicas("adder")
            assert {(r.id, r.node, r.pid, r.address) for r in replicas} <= expected, cluster.logs()
            time.sleep(0.2)                                      # a bounded watch for something that must not happen
        after = admin.wait_for(lambda: ready(admin, 2), "2 ready replicas after the restart", mesh_=cluster)
        assert {(r.id, r.node, r.pid, r.address) for r in after} == expected
        assert all(r.restarts == 0 for r in after)
        assert not any(" lost" in line for line in restarted.output), "".join(restarted.output)
        assert longest < HEARTBEAT_TIMEOUT_S, f"an agent backed off {longest}s, past the heartbeat timeout"
        admin.close()
    finally:
        cluster.close()
