"""The control plane end to end: real schedulers, node agents with fake GPUs, runtime replicas, etcd.

Each test builds its own small mesh on loopback (ports picked at run time)
and tears it down. Heartbeats and election TTLs are shortened (see
mesh_harness) so failures heal in seconds.
"""

from __future__ import annotations

import collections

import grpc
import numpy as np
import pytest
from mesh_harness import Admin, Mesh, deployment_yaml

from meshserve.clients import InferenceClient
from meshserve.protos.mesh import control_pb2 as mesh


def ready(admin: Admin, deployment: str, count: int):
    replicas = admin.replicas(deployment)
    return replicas if len(replicas) == count and all(r.state == "ready" for r in replicas) else None


def assert_serves(replicas) -> None:
    """Every replica answers add_sub at the address the scheduler reports."""
    a = np.arange(16, dtype=np.float32)[None, :]
    for replica in replicas:
        with InferenceClient(replica.address, timeout=10) as client:
            out = client.infer("add_sub", {"INPUT0": a, "INPUT1": a})
            np.testing.assert_array_equal(out["OUTPUT0"], 2 * a)


def test_replicas_spread_across_hosts_and_heal_when_a_host_dies(cluster, tmp_path):
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    agents = {name: cluster.agent(name, scheduler.address) for name in ("node-a", "node-b", "node-c")}
    admin = Admin(scheduler.address)
    admin.wait_for(lambda: len([n for n in admin.nodes() if n.state == "ready"]) == 3, "3 nodes", mesh_=cluster)
    admin.apply(deployment_yaml("adder", replicas=6))
    replicas = admin.wait_for(lambda: ready(admin, "adder", 6), "6 ready replicas", mesh_=cluster)
    assert collections.Counter(r.node for r in replicas) == {"node-a": 2, "node-b": 2, "node-c": 2}
    assert all(len(r.gpu_indices) == 1 for r in replicas)
    assert_serves(replicas)

    agents["node-b"].kill_host()
    healed = admin.wait_for(
        lambda: (r := ready(admin, "adder", 6)) and all(x.node != "node-b" for x in r) and r,
        "6 ready replicas off the dead host", mesh_=cluster)
    assert collections.Counter(r.node for r in healed) == {"node-a": 3, "node-c": 3}
    assert {n.name: n.state for n in admin.nodes()}["node-b"] == "lost"
    assert_serves(healed)
    admin.close()


def _restart_keeps_everything(cluster: Mesh, store_url: str) -> None:
    scheduler = cluster.scheduler(store_url, "s1")
    for name in ("node-a", "node-b"):
        cluster.agent(name, scheduler.address)
    admin = Admin(scheduler.address)
    admin.apply(deployment_yaml("adder", replicas=4))
    before = admin.wait_for(lambda: ready(admin, "adder", 4), "4 ready replicas", mesh_=cluster)
    admin.close()

    port = scheduler.address.rsplit(":", 1)[1]
    assert scheduler.stop() == 0
    restarted = cluster_restart(cluster, store_url, port)
    admin = Admin(restarted.address)
    after = admin.wait_for(lambda: ready(admin, "adder", 4), "4 ready replicas after restart", mesh_=cluster)
    assert {(r.id, r.node, r.pid, r.address) for r in after} == {(r.id, r.node, r.pid, r.address) for r in before}
    assert admin.stub.Get(mesh.GetRequest(kind="deployments"), timeout=10).deployments[0].revision == 1
    assert_serves(after)
    admin.close()


def cluster_restart(cluster: Mesh, store_url: str, port: str):
    """The same scheduler again, on the same port, so its agents find it."""
    from mesh_harness import ELECTION_TTL_S, HEARTBEAT_TIMEOUT_S, REPORT_INTERVAL_S, Process

    process = Process("scheduler-s1-restarted", [
        "-m", "meshserve.scheduler", "serve", "--listen", f"127.0.0.1:{port}", "--store", store_url, "--id", "s1",
        "--report-interval", str(REPORT_INTERVAL_S), "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S),
        "--election-ttl", str(ELECTION_TTL_S)])
    cluster.processes.append(process)
    process.wait_listening()
    admin = Admin(process.address)
    admin.wait_for(lambda: admin.leader().is_leader, "the restarted scheduler to lead", mesh_=cluster)
    admin.close()
    return process


def test_scheduler_restart_on_sqlite_loses_and_duplicates_nothing(cluster, tmp_path):
    _restart_keeps_everything(cluster, f"sqlite:///{tmp_path / 'state.db'}")


def test_scheduler_restart_on_etcd_loses_and_duplicates_nothing(cluster, etcd):
    _restart_keeps_everything(cluster, f"etcd://{etcd.endpoint}")


def test_standby_scheduler_takes_over_when_the_leader_dies(cluster, etcd):
    store = f"etcd://{etcd.endpoint}"
    first = cluster.scheduler(store, "s1")
    second = cluster.scheduler(store, "s2", wait_leading=False)
    schedulers = {"s1": first, "s2": second}
    both = f"{first.address},{second.address}"
    for name in ("node-a", "node-b"):
        cluster.agent(name, both)
    admins = {name: Admin(process.address) for name, process in schedulers.items()}
    leader = admins["s1"].wait_for(
        lambda: next((n for n, a in admins.items() if a.leader().is_leader), None), "a leader")
    standby = "s2" if leader == "s1" else "s1"
    assert admins[standby].leader().leader_id == leader
    with pytest.raises(grpc.RpcError) as refused:
        admins[standby].apply(deployment_yaml("adder", replicas=2))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert leader in refused.value.details()

    admins[leader].apply(deployment_yaml("adder", replicas=2))
    before = admins[leader].wait_for(lambda: ready(admins[leader], "adder", 2), "2 ready", mesh_=cluster)

    schedulers[leader].kill_host()
    survivor = admins[standby]
    survivor.wait_for(lambda: survivor.leader().is_leader, "the standby to lead", mesh_=cluster)
    after = survivor.wait_for(lambda: ready(survivor, "adder", 2), "2 ready under the new leader", mesh_=cluster)
    assert {r.id for r in after} == {r.id for r in before}
    survivor.stub.Scale(mesh.ScaleRequest(name="adder", replicas=3), timeout=10)
    survivor.wait_for(lambda: ready(survivor, "adder", 3), "3 ready after scaling", mesh_=cluster)
    for admin in admins.values():
        admin.close()


def test_a_replica_that_fits_nowhere_stays_pending_and_explain_says_why(cluster, tmp_path):
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    cluster.agent("small", scheduler.address, fake_gpus="1x24GiB")
    admin = Admin(scheduler.address)
    admin.wait_for(lambda: admin.nodes(), "the node")
    admin.apply(deployment_yaml("big", replicas=1, gpu_memory="40GiB"))
    pending = admin.wait_for(lambda: [r for r in admin.replicas("big") if "40 GiB" in r.reason and r.state == "pending"],
                             "a pending replica whose reason names the 40 GiB it lacks", mesh_=cluster)
    lines = admin.explain("replica", pending[0].id)
    assert "pending" in lines[0] and "40 GiB" in "\n".join(lines), lines
    assert "pending" in "\n".join(admin.explain("deployment", "big"))
    admin.close()


def test_a_bad_spec_is_refused_naming_the_field(cluster, tmp_path):
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    admin = Admin(scheduler.address)
    with pytest.raises(grpc.RpcError) as refused:
        admin.apply(deployment_yaml("bad", replicas=1, gpu_memory="40Gx"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "gpu_memory" in refused.value.details()
    admin.close()


def test_a_returning_agent_is_reconciled_never_duplicated(cluster, tmp_path):
    """An agent frozen past the heartbeat timeout is lost; when it wakes it gives up what moved away."""
    import os
    import signal
    import time

    from mesh_harness import HEARTBEAT_TIMEOUT_S

    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    agents = {name: cluster.agent(name, scheduler.address) for name in ("node-a", "node-b")}
    admin = Admin(scheduler.address)
    admin.wait_for(lambda: len(admin.nodes()) == 2, "2 nodes", mesh_=cluster)
    admin.apply(deployment_yaml("adder", replicas=2))
    before = admin.wait_for(lambda: ready(admin, "adder", 2), "2 ready", mesh_=cluster)
    frozen = next(r for r in before if r.node == "node-a")

    os.kill(agents["node-a"].proc.pid, signal.SIGSTOP)  # the agent stops reporting; its replica keeps running
    try:
        moved = admin.wait_for(
            lambda: (r := ready(admin, "adder", 2)) and all(x.node == "node-b" for x in r) and r,
            "both replicas on node-b", timeout=HEARTBEAT_TIMEOUT_S * 30, mesh_=cluster)
    finally:
        os.kill(agents["node-a"].proc.pid, signal.SIGCONT)
    admin.wait_for(lambda: {n.name: n.state for n in admin.nodes()}["node-a"] == "ready", "node-a back")

    def old_replica_gone():
        try:
            os.kill(frozen.pid, 0)
            return False
        except ProcessLookupError:
            return True
    admin.wait_for(old_replica_gone, f"the replica node-a ran (pid {frozen.pid}) to be stopped", mesh_=cluster)
    time.sleep(HEARTBEAT_TIMEOUT_S)  # a few report rounds after the return: nothing may come back
    after = admin.replicas("adder")
    assert len(after) == 2 and {r.id for r in after} == {r.id for r in moved}
    assert all(r.node == "node-b" and r.state == "ready" for r in after)
    admin.close()


def test_drain_moves_replicas_off_a_node_and_cordon_keeps_new_ones_away(cluster, tmp_path):
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    for name in ("node-a", "node-b"):
        cluster.agent(name, scheduler.address)
    admin = Admin(scheduler.address)
    admin.wait_for(lambda: len(admin.nodes()) == 2, "2 nodes", mesh_=cluster)
    admin.apply(deployment_yaml("adder", replicas=2))
    admin.wait_for(lambda: ready(admin, "adder", 2), "2 ready", mesh_=cluster)

    admin.stub.Drain(mesh.NodeRequest(name="node-a"), timeout=10)
    admin.wait_for(lambda: (r := ready(admin, "adder", 2)) and all(x.node == "node-b" for x in r),
                   "both replicas on node-b after the drain", mesh_=cluster)
    admin.stub.Scale(mesh.ScaleRequest(name="adder", replicas=3), timeout=10)
    third = admin.wait_for(lambda: ready(admin, "adder", 3), "3 ready", mesh_=cluster)
    assert all(r.node == "node-b" for r in third)  # node-a is still cordoned

    admin.stub.Uncordon(mesh.NodeRequest(name="node-a"), timeout=10)
    admin.stub.Scale(mesh.ScaleRequest(name="adder", replicas=4), timeout=10)
    four = admin.wait_for(lambda: ready(admin, "adder", 4), "4 ready", mesh_=cluster)
    assert any(r.node == "node-a" for r in four)
    admin.close()


def test_a_new_revision_rolls_out_and_removed_replicas_drain_first(cluster, tmp_path):
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    for name in ("node-a", "node-b"):
        cluster.agent(name, scheduler.address)
    admin = Admin(scheduler.address)
    admin.wait_for(lambda: len(admin.nodes()) == 2, "2 nodes", mesh_=cluster)
    admin.apply(deployment_yaml("adder", replicas=2))
    first = admin.wait_for(lambda: ready(admin, "adder", 2), "2 ready", mesh_=cluster)

    changed = deployment_yaml("adder", replicas=2) + "runtime_args: [--drain-delay, '1']\n"
    assert admin.apply(changed) == ["deployment/adder configured"]
    seen_states = set()

    def rolled():
        replicas = admin.replicas("adder")
        seen_states.update(r.state for r in replicas)
        return ready(admin, "adder", 2) if all(r.revision == 2 for r in replicas) else None
    second = admin.wait_for(rolled, "2 ready replicas of revision 2", mesh_=cluster)
    assert not {r.id for r in second} & {r.id for r in first}
    assert "draining" in seen_states
    deployment = admin.stub.Get(mesh.GetRequest(kind="deployments"), timeout=10).deployments[0]
    assert deployment.revision == 2 and list(deployment.revision_history) == [1, 2]

    assert admin.apply(changed.replace("replicas: 2", "replicas: 1")) == ["deployment/adder configured"]
    admin.wait_for(lambda: ready(admin, "adder", 1), "1 ready after scaling down", mesh_=cluster)
    assert admin.stub.Get(mesh.GetRequest(kind="deployments"), timeout=10).deployments[0].revision == 2
    admin.close()


def _routes(address: str) -> dict[int, tuple[int, int]]:
    """revision -> (weight, endpoints) in the scheduler's current route table."""
    from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc

    with grpc.insecure_channel(address) as channel:
        stream = mesh_grpc.RouteServiceStub(channel).WatchRoutes(mesh.WatchRoutesRequest(), timeout=10)
        table = next(stream)
        stream.cancel()
    return {route.revision: (route.weight, len(route.endpoints)) for route in table.routes}


def test_a_canary_takes_its_weight_until_promoted_or_rolled_back(cluster, tmp_path):
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    for name in ("node-a", "node-b"):
        cluster.agent(name, scheduler.address)
    admin = Admin(scheduler.address)
    admin.wait_for(lambda: len(admin.nodes()) == 2, "2 nodes", mesh_=cluster)
    canary = "rollout: {strategy: canary, canary_weight: 25, canary_replicas: 1}\n"
    admin.apply(deployment_yaml("adder", replicas=2) + canary)
    admin.wait_for(lambda: ready(admin, "adder", 2), "2 ready", mesh_=cluster)
    assert _routes(scheduler.address) == {1: (2, 2)}

    admin.apply(deployment_yaml("adder", replicas=2) + canary + "runtime_args: [--drain-delay, '1']\n")
    admin.wait_for(lambda: ready(admin, "adder", 3), "2 stable and 1 canary ready", mesh_=cluster)
    assert sorted(r.revision for r in admin.replicas("adder")) == [1, 1, 2]
    assert admin.wait_for(lambda: _routes(scheduler.address) == {1: (75, 2), 2: (25, 1)}, "weights 75/25")
    assert any("canary" in line for line in admin.explain("deployment", "adder"))

    rolled = admin.stub.Rollback(mesh.RolloutRequest(name="adder"), timeout=10)
    assert rolled.revision == 1
    admin.wait_for(lambda: (r := ready(admin, "adder", 2)) and all(x.revision == 1 for x in r), "back to 1")

    admin.apply(deployment_yaml("adder", replicas=2) + canary + "runtime_args: [--drain-delay, '1']\n")
    admin.wait_for(lambda: ready(admin, "adder", 3), "the canary again", mesh_=cluster)
    with pytest.raises(grpc.RpcError) as no_canary:
        admin.stub.Promote(mesh.RolloutRequest(name="missing"), timeout=10)
    assert no_canary.value.code() == grpc.StatusCode.NOT_FOUND
    promoted = admin.stub.Promote(mesh.RolloutRequest(name="adder"), timeout=10)
    admin.wait_for(lambda: (r := ready(admin, "adder", 2)) and all(x.revision == promoted.revision for x in r),
                   "the promoted revision everywhere", mesh_=cluster)
    assert admin.wait_for(lambda: _routes(scheduler.address) == {promoted.revision: (2, 2)}, "one route")
    with pytest.raises(grpc.RpcError) as nothing_to_promote:
        admin.stub.Promote(mesh.RolloutRequest(name="adder"), timeout=10)
    assert nothing_to_promote.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    admin.close()


def pipeline_yaml(name: str, colocate: str, step_cpu: str) -> str:
    from mesh_harness import REPO_ROOT

    return f"""kind: Pipeline
name: {name}
model:
  repository: {REPO_ROOT / "examples" / "pipelines" / "large_tensor"}
  name: large_pipeline
replicas: 1
resources: {{cpu: 100m}}
colocate: {colocate}
steps:
  - model: expand
    resources: {{cpu: {step_cpu}}}
  - model: reduce
    resources: {{cpu: {step_cpu}}}
"""


def assert_pipeline_serves(address: str) -> None:
    with InferenceClient(address, timeout=30) as client:
        out = client.infer("large_pipeline", {"INPUT": np.arange(16, dtype=np.float32)})
    np.testing.assert_allclose(out["SUMMARY"], [18_750_000.0, 18.75], rtol=1e-5)


def test_a_pipeline_runs_co_located_in_one_process(cluster, tmp_path):
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    cluster.agent("node-a", scheduler.address)
    admin = Admin(scheduler.address)
    admin.wait_for(lambda: admin.nodes(), "the node", mesh_=cluster)
    admin.apply(pipeline_yaml("pipe", "required", "250m"))
    [leader] = admin.wait_for(lambda: ready(admin, "pipe", 1), "the pipeline replica", mesh_=cluster)
    assert "co-located" in "\n".join(admin.explain("replica", leader.id))
    assert_pipeline_serves(leader.address)
    admin.close()


def test_a_pipeline_that_fits_no_single_host_is_split_and_explained(cluster, tmp_path):
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    for name in ("node-a", "node-b"):
        cluster.agent(name, scheduler.address)
    admin = Admin(scheduler.address)
    admin.wait_for(lambda: len(admin.nodes()) == 2, "2 nodes", mesh_=cluster)
    # Each step wants 1.5 of the 2 cores every host reports: they cannot share a host.
    admin.apply(pipeline_yaml("pipe", "preferred", "1500m"))

    def split_and_ready():
        replicas = admin.replicas("pipe")
        return replicas if len(replicas) == 2 and all(r.state == "ready" for r in replicas) else None
    replicas = admin.wait_for(split_and_ready, "the leader and its remote step ready", mesh_=cluster)
    assert len({r.node for r in replicas}) == 2
    leader = next(r for r in replicas if "split" in "\n".join(admin.explain("replica", r.id)))
    lines = "\n".join(admin.explain("replica", leader.id))
    assert "no single node fits every step" in lines and "step reduce on" in lines and "over gRPC" in lines
    assert_pipeline_serves(leader.address)

    # colocate: required on the same hosts waits, and says why.
    admin.apply(pipeline_yaml("strict", "required", "1500m"))
    waiting = admin.wait_for(lambda: [r for r in admin.replicas("strict") if "colocate is required" in r.reason],
                             "the required pipeline to wait with a reason", mesh_=cluster)
    assert waiting[0].state == "pending"
    admin.close()


def test_drain_that_would_leave_a_deployment_without_a_ready_replica_needs_force(cluster, tmp_path):
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    cluster.agent("node-a", scheduler.address)
    admin = Admin(scheduler.address)
    admin.wait_for(lambda: len(admin.nodes()) == 1, "the node", mesh_=cluster)
    admin.apply(deployment_yaml("adder", replicas=1))
    admin.wait_for(lambda: ready(admin, "adder", 1), "1 ready", mesh_=cluster)

    with pytest.raises(grpc.RpcError) as refused:
        admin.stub.Drain(mesh.NodeRequest(name="node-a"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "deployment/adder" in refused.value.details() and "--force" in refused.value.details()
    assert not any(n.draining for n in admin.nodes())          # refused: nothing changed
    assert ready(admin, "adder", 1)

    admin.stub.Drain(mesh.NodeRequest(name="node-a", force=True), timeout=10)
    assert all(n.draining for n in admin.nodes())
    admin.close()
