"""The fault suite: each fault under steady bounded load through the proxy, with a failed-call budget.

Every scenario builds a small real mesh on loopback (schedulers, node agents
with fake GPUs, runtime replicas, a proxy; a real etcd where the scenario
names it), puts ``SteadyLoad`` on the proxy, injects one fault, lets the
mesh settle, and then asserts:

- the failed-call budget: 0 wherever the design promises it (DESIGN.md,
  "Failure and bad input"); a call counts as failed after the client
  library's own UNAVAILABLE retries, as a user would see it;
- the end state: exactly the replicas the deployment asks for, all ready,
  each one a live runtime process under its node's agent — none lost, none
  duplicated.

Timings come from tests/mesh_harness.py (report every 0.3 s, a node is lost
after 3 s of silence, election TTL 2 s), so each fault heals in seconds.
"""

from __future__ import annotations

import os
import re
import time

import numpy as np
from mesh_harness import CONVERGE_TIMEOUT_S, HEARTBEAT_TIMEOUT_S, Admin, Mesh, Process, deployment_yaml
from steady_load import SteadyLoad

from meshserve.clients import InferenceClient
from meshserve.protos.mesh import control_pb2 as mesh

# Calls that must succeed before a fault is injected (the load really flows) and after it (it flows again).
WARMUP_CALLS = 200
# Pauses are longer than the heartbeat timeout and the election TTL, so the fault is really noticed.
PAUSE_S = HEARTBEAT_TIMEOUT_S + 3.0


def ready(admin: Admin, deployment: str, count: int, revision: int | None = None):
    replicas = admin.replicas(deployment)
    if len(replicas) != count or any(r.state != "ready" for r in replicas):
        return None
    if revision is not None and any(r.revision != revision for r in replicas):
        return None
    return replicas


def runtime_children(agent_pid: int) -> set[int]:
    """The live runtime processes an agent started (its children running the runtime)."""
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
        except OSError:
            continue
        if int(fields["PPid"]) == agent_pid and fields["State"].strip()[0] != "Z" and b"meshserve.runtime" in argv:
            children.add(int(entry))
    return children


def assert_exactly(admin: Admin, cluster: Mesh, deployment: str, count: int, revision: int | None = None):
    """The store holds ``count`` ready replicas, and each is one live runtime process — nothing more."""
    replicas = admin.wait_for(lambda: ready(admin, deployment, count, revision),
                              f"{count} ready replicas of {deployment}", mesh_=cluster)
    assert len({r.id for r in replicas}) == count
    agents = {p.name.removeprefix("agent-"): p for p in cluster.processes if p.name.startswith("agent-")}

    def processes_match():
        every = admin.replicas()   # other deployments' replicas run under the same agents
        live = {name: runtime_children(agent.proc.pid) for name, agent in agents.items()}
        return all({r.pid for r in every if r.node == name} == pids for name, pids in live.items())

    admin.wait_for(processes_match, "one runtime process per replica record and no other", mesh_=cluster)
    return replicas


def start_load(proxy_address: str) -> SteadyLoad:
    load = SteadyLoad(proxy_address).start()
    load.wait_calls(WARMUP_CALLS)
    return load


def finish_load(load: SteadyLoad, budget: int = 0) -> None:
    load.wait_calls(WARMUP_CALLS)
    load.stop()
    assert load.failed <= budget, load.summary()


def two_node_mesh(cluster: Mesh, store_url: str, replicas: int, schedulers: int = 1):
    processes = [cluster.scheduler(store_url, "s1")]
    processes += [cluster.scheduler(store_url, f"s{i + 1}", wait_leading=False) for i in range(1, schedulers)]
    addresses = ",".join(p.address for p in processes)
    for name in ("node-a", "node-b"):
        cluster.agent(name, addresses)
    admin = Admin(processes[0].address)
    admin.wait_for(lambda: len([n for n in admin.nodes() if n.state == "ready"]) == 2, "2 nodes", mesh_=cluster)
    admin.apply(deployment_yaml("adder", replicas=replicas))
    before = assert_exactly(admin, cluster, "adder", replicas)
    proxy = cluster.proxy(addresses)
    return processes, admin, proxy, before


def leading_admin(processes, cluster: Mesh) -> tuple[int, Admin]:
    admins = [Admin(p.address) for p in processes]

    def leader():
        for index, admin in enumerate(admins):
            try:
                if admin.leader().is_leader:
                    return (index,)
            except Exception:  # a paused or restarting scheduler
                continue
        return None

    (index,) = admins[0].wait_for(leader, "a leader", mesh_=cluster)
    return index, admins[index]


def echo_through(proxy_address: str) -> bool:
    """A call for a model deployed after the fault: the proxy serves the current leader's routes."""
    with InferenceClient(proxy_address, timeout=5) as client:
        try:
            out = client.infer("echo_bytes", {"INPUT0": np.array([b"x"], dtype=np.object_)})
        except Exception:
            return False
    return out["OUTPUT0"].tolist() == [b"x"]


def test_leader_pause_and_resume_on_etcd_fails_no_call(cluster, etcd):
    processes, admin, proxy, before = two_node_mesh(cluster, f"etcd://{etcd.endpoint}", replicas=2, schedulers=2)
    load = start_load(proxy.address)

    processes[0].pause()
    time.sleep(PAUSE_S)
    processes[0].resume()

    index, leader = leading_admin(processes, cluster)
    leader.apply(deployment_yaml("echo", replicas=1, model="echo_bytes"))
    leader.wait_for(lambda: echo_through(proxy.address), "the proxy to route a model deployed after the pause",
                    mesh_=cluster)
    finish_load(load)
    after = assert_exactly(leader, cluster, "adder", 2)
    assert {(r.id, r.pid) for r in after} == {(r.id, r.pid) for r in before}, "a healthy replica was restarted"


def test_etcd_stop_and_start_fails_no_call(cluster, etcd):
    processes, admin, proxy, before = two_node_mesh(cluster, f"etcd://{etcd.endpoint}", replicas=2)
    load = start_load(proxy.address)

    etcd.stop()
    time.sleep(PAUSE_S)
    etcd.start()

    admin.wait_for(lambda: admin.leader().is_leader, "the scheduler to lead again", mesh_=cluster)
    finish_load(load)
    after = assert_exactly(admin, cluster, "adder", 2)
    assert {(r.id, r.pid) for r in after} == {(r.id, r.pid) for r in before}, "a healthy replica was restarted"


def registered(agent: Process) -> int:
    return sum("registered with scheduler" in line for line in agent.output)


def wait_for_longest_backoff(agent: Process) -> None:
    """Return just after the agent starts its longest reconnect wait (the same delay logged twice in a row)."""
    deadline = time.monotonic() + CONVERGE_TIMEOUT_S
    seen = len(agent.output)
    delays: list[str] = []
    while time.monotonic() < deadline:
        lines = agent.output[seen:]
        seen += len(lines)
        delays += [m.group(1) for line in lines if (m := re.search(r"reconnecting in (\S+)s", line))]
        if len(delays) >= 2 and delays[-1] == delays[-2] and lines:
            return
        time.sleep(0.05)
    raise AssertionError(f"{agent.name} never settled on a reconnect delay: {delays}")


def test_scheduler_kill_and_restart_on_sqlite_with_agents_in_long_backoff_fails_no_call(cluster, tmp_path):
    store = f"sqlite:///{tmp_path / 'state.db'}"
    processes, admin, proxy, before = two_node_mesh(cluster, store, replicas=2)
    load = start_load(proxy.address)
    address = processes[0].address

    agents = [p for p in cluster.processes if p.name.startswith("agent-")]
    registrations = [registered(agent) for agent in agents]

    processes[0].kill_host()
    wait_for_longest_backoff(agents[0])
    restarted = cluster.scheduler(store, "s1", listen=address)
    admin = Admin(restarted.address)

    admin.wait_for(lambda: all(registered(a) > n for a, n in zip(agents, registrations, strict=True)), "both agents back",
                   mesh_=cluster)
    finish_load(load)
    assert all(n.state == "ready" for n in admin.nodes()), admin.nodes()
    after = assert_exactly(admin, cluster, "adder", 2)
    assert {(r.id, r.pid) for r in after} == {(r.id, r.pid) for r in before}, "a healthy replica was restarted"


def test_agent_paused_past_the_heartbeat_timeout_fails_no_call(cluster, tmp_path):
    """The only replica's host goes silent: it stays routed (it still serves) until its replacement is ready."""
    processes, admin, proxy, before = two_node_mesh(cluster, f"sqlite:///{tmp_path / 'state.db'}", replicas=1)
    silent = before[0].node
    paused = next(p for p in cluster.processes if p.name == f"agent-{silent}")
    load = start_load(proxy.address)

    paused.pause()
    admin.wait_for(lambda: {n.name: n.state for n in admin.nodes()}[silent] == "lost", f"{silent} lost",
                   mesh_=cluster)
    admin.wait_for(lambda: (r := ready(admin, "adder", 1)) and r[0].node != silent, "the replica ready elsewhere",
                   mesh_=cluster)
    load.wait_calls(WARMUP_CALLS)
    paused.resume()

    finish_load(load)
    after = assert_exactly(admin, cluster, "adder", 1)
    assert after[0].node != silent


def test_replica_killed_under_load_fails_no_call(cluster, tmp_path):
    processes, admin, proxy, before = two_node_mesh(cluster, f"sqlite:///{tmp_path / 'state.db'}", replicas=2)
    load = start_load(proxy.address)

    os.kill(before[0].pid, 9)
    admin.wait_for(lambda: (r := ready(admin, "adder", 2)) and before[0].pid not in {x.pid for x in r},
                   "the killed replica restarted", mesh_=cluster)

    finish_load(load)
    assert_exactly(admin, cluster, "adder", 2)


def test_rollout_under_load_fails_no_call(cluster, tmp_path):
    processes, admin, proxy, before = two_node_mesh(cluster, f"sqlite:///{tmp_path / 'state.db'}", replicas=2)
    load = start_load(proxy.address)

    admin.apply(deployment_yaml("adder", replicas=2, cpu="110m"))  # a new revision
    admin.wait_for(lambda: ready(admin, "adder", 2, revision=2), "revision 2 rolled out", mesh_=cluster)

    finish_load(load)
    assert_exactly(admin, cluster, "adder", 2, revision=2)


def test_scale_down_under_load_fails_no_call(cluster, tmp_path):
    processes, admin, proxy, before = two_node_mesh(cluster, f"sqlite:///{tmp_path / 'state.db'}", replicas=4)
    load = start_load(proxy.address)

    admin.stub.Scale(mesh.ScaleRequest(name="adder", replicas=1), timeout=10)
    admin.wait_for(lambda: ready(admin, "adder", 1), "scaled to 1", mesh_=cluster)

    finish_load(load)
    assert_exactly(admin, cluster, "adder", 1)
