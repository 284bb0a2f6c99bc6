"""Serving through the proxy while the control plane changes things: no call fails.

- Removed replicas leave the routes, then finish what they hold (issue 8, item 18).
- A frozen agent's healthy replicas stay routed until their replacements serve (item 6).

Real processes on loopback: a scheduler, node agents with fake GPUs, their
runtime replicas and a proxy following the scheduler's routes, with client
threads calling add_sub through the proxy the whole time (no client retries:
every failure the proxy answers is counted).
"""

from __future__ import annotations

import os
import signal

from mesh_harness import CONVERGE_TIMEOUT_S, HEARTBEAT_TIMEOUT_S, Admin, Process, deployment_yaml
from steady_load import SteadyLoad

from meshserve.protos.mesh import control_pb2 as mesh

CLIENTS = 8
STEADY_CALLS = 200          # successful calls before and after the change: the load is really flowing


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def ready_replicas(admin: Admin, count: int, revision: int = 1):
    replicas = admin.replicas("adder")
    return replicas if len(replicas) == count and all(r.state == "ready" and r.revision == revision
                                                       for r in replicas) else None


def test_scaling_down_and_rolling_out_under_load_fails_no_call(cluster, tmp_path):
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    cluster.agent("node-a", scheduler.address)
    proxy = Process("proxy", ["-m", "meshserve.proxy", "--scheduler", scheduler.address, "--listen", "127.0.0.1:0"])
    cluster.processes.append(proxy)
    admin = Admin(scheduler.address)
    admin.wait_for(lambda: admin.nodes(), "the node", mesh_=cluster)
    admin.apply(deployment_yaml("adder", replicas=3))
    three = admin.wait_for(lambda: ready_replicas(admin, 3), "3 ready replicas", mesh_=cluster)
    proxy.wait_listening()

    load = SteadyLoad(proxy.address, workers=CLIENTS, retries=0).start()
    try:
        load.wait_calls(STEADY_CALLS, CONVERGE_TIMEOUT_S)
        admin.stub.Scale(mesh.ScaleRequest(name="adder", replicas=1), timeout=10)
        [kept] = admin.wait_for(lambda: ready_replicas(admin, 1), "1 replica left", mesh_=cluster)
        removed = [r.pid for r in three if r.id != kept.id]
        admin.wait_for(lambda: all(_gone(pid) for pid in removed), "the removed replicas to exit", mesh_=cluster)
        load.wait_calls(STEADY_CALLS, CONVERGE_TIMEOUT_S)

        admin.apply(deployment_yaml("adder", replicas=1) + "runtime_args: [--grace-period, '20']\n")
        admin.wait_for(lambda: ready_replicas(admin, 1, revision=2), "revision 2 rolled out", mesh_=cluster)
        admin.wait_for(lambda: _gone(kept.pid), "the replica of revision 1 to exit", mesh_=cluster)
        load.wait_calls(STEADY_CALLS, CONVERGE_TIMEOUT_S)
    finally:
        load.stop()
    print(f"scale 3 -> 1 and a rollout under load: {load.summary()}")
    assert not load.failed, load.summary()
    admin.close()


def test_a_frozen_agents_healthy_replica_serves_until_its_replacement_is_ready(cluster, tmp_path):
    """SIGSTOP the agent of the only replica past the heartbeat timeout: its process still serves,
    so it stays routed until the replacement on the other node is ready; then the agent wakes
    up and stops it gracefully. Before: the route vanished and calls failed NOT_FOUND."""
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    agents = {name: cluster.agent(name, scheduler.address) for name in ("node-a", "node-b")}
    proxy = Process("proxy", ["-m", "meshserve.proxy", "--scheduler", scheduler.address, "--listen", "127.0.0.1:0"])
    cluster.processes.append(proxy)
    admin = Admin(scheduler.address)
    admin.wait_for(lambda: len(admin.nodes()) == 2, "2 nodes", mesh_=cluster)
    admin.apply(deployment_yaml("adder", replicas=1))
    [first] = admin.wait_for(lambda: ready_replicas(admin, 1), "1 ready replica", mesh_=cluster)
    proxy.wait_listening()
    frozen = agents[first.node]

    load = SteadyLoad(proxy.address, workers=CLIENTS, retries=0).start()
    try:
        load.wait_calls(STEADY_CALLS, CONVERGE_TIMEOUT_S)
        os.kill(frozen.proc.pid, signal.SIGSTOP)   # the agent only: its replica keeps running
        try:
            admin.wait_for(lambda: {n.name: n.state for n in admin.nodes()}[first.node] == "lost",
                           f"{first.node} to be lost", timeout=HEARTBEAT_TIMEOUT_S * 10, mesh_=cluster)
            [replacement] = admin.wait_for(
                lambda: (r := ready_replicas(admin, 1)) and r[0].node != first.node and r,
                "the replacement to be ready on the other node", mesh_=cluster)
            load.wait_calls(STEADY_CALLS, CONVERGE_TIMEOUT_S)
        finally:
            os.kill(frozen.proc.pid, signal.SIGCONT)
        admin.wait_for(lambda: _gone(first.pid), "the replaced replica to be stopped", mesh_=cluster)
        load.wait_calls(STEADY_CALLS, CONVERGE_TIMEOUT_S)
    finally:
        load.stop()
    print(f"agent SIGSTOP past the heartbeat timeout under load: {load.summary()}")
    assert not load.failed, load.summary()
    assert [r.id for r in admin.replicas("adder")] == [replacement.id]
    admin.close()

