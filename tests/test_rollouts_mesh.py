"""Rollouts with real processes: under load with no failed call, in place on a full host, rolled back when the
new revision cannot start, and `scheduler ctl rollout status|history` telling the outcome by exit code."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from mesh_harness import EXAMPLES, REPO_ROOT, Admin
from steady_load import SteadyLoad

from meshserve.clients import InferenceClient
from meshserve.common.errors import MeshError
from meshserve.node_agent.policy import development_policy_yaml
from meshserve.protos.mesh import control_pb2 as mesh

BROKEN_MODEL = '''
class Predictor:
    def __init__(self, config):
        raise RuntimeError("this revision cannot load")

    def predict(self, inputs):
        return {}
'''


def adder_yaml(*, replicas: int, gpu_memory: str = "1GiB", drain_delay: int = 1, rollout: str = "",
               repository=EXAMPLES, model: str = "add_sub") -> str:
    return f"""kind: Deployment
name: adder
model: {{repository: {repository}, name: {model}}}
replicas: {replicas}
resources: {{gpus: 1, gpu_memory: {gpu_memory}, cpu: 10m}}
runtime_args: [--drain-delay, "{drain_delay}"]
rollout:
  progress_deadline_s: 120
{rollout}"""


def ctl(address: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshserve.scheduler", "ctl", "--server", address, *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def start(cluster, tmp_path, fake_gpus: str = "2x80GiB", policy: str | None = None):
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    cluster.agent("node-a", scheduler.address, fake_gpus=fake_gpus, policy=policy)
    admin = Admin(scheduler.address)
    admin.wait_for(lambda: [n for n in admin.nodes() if n.state == "ready"], "the node", mesh_=cluster)
    return scheduler.address, admin


def answers(proxy: str) -> bool:
    a = np.ones((1, 16), dtype=np.float32)
    with InferenceClient(proxy, timeout=5, retries=0) as client:
        try:
            return client.infer("add_sub", {"INPUT0": a, "INPUT1": a})["OUTPUT0"].tolist() == (2 * a).tolist()
        except MeshError:
            return False


def all_at(admin: Admin, revision: int, count: int) -> bool:
    replicas = admin.replicas("adder")
    return len(replicas) == count and all(r.revision == revision and r.state == "ready" for r in replicas)


def test_a_rollout_under_load_with_max_unavailable_0_fails_no_call(cluster, tmp_path):
    address, admin = start(cluster, tmp_path)
    admin.apply(adder_yaml(replicas=2, rollout="  max_surge: 1\n  max_unavailable: 0\n"))
    admin.wait_for(lambda: all_at(admin, 1, 2), "revision 1 ready", mesh_=cluster)
    proxy = cluster.proxy(address)
    admin.wait_for(lambda: answers(proxy.address), "the proxy to serve adder", mesh_=cluster)
    load = SteadyLoad(proxy.address, workers=4, retries=0).start()
    try:
        load.wait_calls(50)
        admin.apply(adder_yaml(replicas=2, drain_delay=2, rollout="  max_surge: 1\n  max_unavailable: 0\n"))
        status = ctl(address, "rollout", "status", "adder", "--wait", "150")
        load.wait_calls(50)
    finally:
        load.stop()
    assert status.returncode == 0, status.stdout + status.stderr
    assert "revision 2 rolled out" in status.stdout
    assert load.failed == 0, load.summary()
    admin.wait_for(lambda: all_at(admin, 2, 2), "only revision 2 left", mesh_=cluster)   # the old ones drain
    history = ctl(address, "rollout", "history", "adder")
    assert history.returncode == 0
    lines = history.stdout.splitlines()
    assert lines[0].split()[:3] == ["REVISION", "APPLIED", "CHANGE"]
    assert "runtime_args" in lines[2] and "(current)" in lines[2]


def test_resource_aware_replaces_in_place_on_a_full_host_and_waiting_says_stuck(cluster, tmp_path):
    address, admin = start(cluster, tmp_path, fake_gpus="1x24GiB")
    admin.apply(adder_yaml(replicas=2, gpu_memory="12GiB"))          # the GPU is full
    admin.wait_for(lambda: all_at(admin, 1, 2), "revision 1 ready", mesh_=cluster)

    admin.apply(adder_yaml(replicas=2, gpu_memory="12GiB", drain_delay=2))   # surge 1: no room for it
    events = lambda: admin.stub.Describe(mesh.DescribeRequest(kind="deployment", name="adder")).events  # noqa: E731
    admin.wait_for(lambda: any("stuck" in e and "resource_aware" in e for e in events()), "a stuck event",
                   mesh_=cluster)
    assert sum(1 for r in admin.replicas("adder") if r.revision == 1 and r.state == "ready") == 2

    admin.apply(adder_yaml(replicas=2, gpu_memory="12GiB", drain_delay=2, rollout="  resource_aware: true\n"))
    status = ctl(address, "rollout", "status", "adder", "--wait", "150")   # a rollout setting: same revision
    assert status.returncode == 0, status.stdout + status.stderr
    admin.wait_for(lambda: all_at(admin, 2, 2), "only revision 2 left", mesh_=cluster)


def test_a_revision_that_cannot_start_is_rolled_back_and_status_exits_1(cluster, tmp_path):
    broken = tmp_path / "models" / "add_sub"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text((EXAMPLES / "add_sub" / "config.pbtxt").read_text())
    (broken / "1" / "model.py").write_text(BROKEN_MODEL)
    address, admin = start(cluster, tmp_path,
                           policy=development_policy_yaml(REPO_ROOT / "examples", tmp_path / "models"))
    admin.apply(adder_yaml(replicas=1))
    admin.wait_for(lambda: all_at(admin, 1, 1), "revision 1 ready", mesh_=cluster)

    admin.apply(adder_yaml(replicas=1, repository=tmp_path / "models"))
    status = ctl(address, "rollout", "status", "adder", "--wait", "150")
    assert status.returncode == 1, status.stdout + status.stderr
    assert "rolled back" in status.stdout and "revision 2" in status.stdout
    deployment = admin.stub.Get(mesh.GetRequest(kind="deployments", name="adder")).deployments[0]
    assert deployment.revision == 1 and deployment.rollout_state.startswith("rolled back")
    admin.wait_for(lambda: all_at(admin, 1, 1), "revision 1 serving alone again", mesh_=cluster)
    events = admin.stub.Describe(mesh.DescribeRequest(kind="deployment", name="adder")).events
    assert any("rollout to revision 2 failed" in e and "rolled back to revision 1" in e for e in events), events


def test_rollout_status_of_a_finished_rollout_and_an_unknown_deployment(cluster, tmp_path):
    address, admin = start(cluster, tmp_path)
    admin.apply(adder_yaml(replicas=1))
    admin.wait_for(lambda: all_at(admin, 1, 1), "revision 1 ready", mesh_=cluster)
    assert ctl(address, "rollout", "status", "adder", "--wait", "60").returncode == 0
    missing = ctl(address, "rollout", "status", "nope", "--wait", "5")
    assert missing.returncode == 1 and "nope" in missing.stderr
