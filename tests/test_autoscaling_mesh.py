"""Autoscaling with real processes: a scheduler, a node agent with fake GPUs, runtimes and the proxy.

The load is closed-loop clients calling ``sleeper`` (tests/models/serving: each call sleeps DELAY_MS, two
run at once per replica) through the proxy, so the calls in flight at the replicas equal the clients.
Windows and delays are shortened in the spec so a scaling decision takes seconds; every wait is bounded.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from mesh_harness import REPO_ROOT, Admin
from steady_load import SteadyLoad

from meshserve.clients import InferenceClient
from meshserve.common.errors import MeshError
from meshserve.protos.mesh import control_pb2 as mesh

SERVING = REPO_ROOT / "tests" / "models" / "serving"
DELAY_MS = 100
INPUTS = {"DELAY_MS": np.array([DELAY_MS], dtype=np.int32)}


def expect_delay(out) -> bool:
    return out["DONE_MS"].tolist() == [DELAY_MS]


def sleeper_yaml(name: str, autoscaling: str | None, replicas: int | None = None) -> str:
    count = f"replicas: {replicas}\n" if replicas is not None else ""
    section = f"autoscaling:\n{autoscaling}" if autoscaling else ""
    return f"""kind: Deployment
name: {name}
model:
  repository: {SERVING}
  name: sleeper
{count}resources:
  gpus: 1
  gpu_memory: 1GiB
  cpu: 10m
{section}"""


def one_node_mesh(cluster, tmp_path) -> tuple[Admin, str]:
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    cluster.agent("node-a", scheduler.address, fake_gpus="4x80GiB")
    admin = Admin(scheduler.address)
    admin.wait_for(lambda: [n for n in admin.nodes() if n.state == "ready"], "the node", mesh_=cluster)
    proxy = cluster.proxy(scheduler.address)
    return admin, proxy.address


def deployment(admin: Admin, name: str) -> mesh.Deployment:
    return admin.stub.Get(mesh.GetRequest(kind="deployments", name=name)).deployments[0]


def ready_count(admin: Admin, name: str) -> int:
    return sum(1 for r in admin.replicas(name) if r.state == "ready")


def test_a_load_step_scales_up_and_back_down_without_a_failed_call(cluster, tmp_path):
    admin, proxy = one_node_mesh(cluster, tmp_path)
    admin.apply(sleeper_yaml("sleepy", """  min_replicas: 1
  max_replicas: 4
  target_in_flight: 2
  stable_window_s: 6
  panic_window_s: 2
  downscale_delay_s: 4
"""))
    admin.wait_for(lambda: ready_count(admin, "sleepy") == 1, "1 ready replica", mesh_=cluster)
    load = SteadyLoad(proxy, workers=8, model="sleeper", inputs=INPUTS, expect=expect_delay).start()
    try:
        load.wait_calls(20)
        admin.wait_for(lambda: ready_count(admin, "sleepy") >= 3, "scaled up to >= 3 ready", mesh_=cluster)
        up = deployment(admin, "sleepy")
        assert up.autoscaling and up.min_replicas == 1 and up.max_replicas == 4
        assert up.last_scaling.startswith("autoscaled ")
    finally:
        load.stop()
    assert load.failed == 0, load.summary()
    admin.wait_for(lambda: deployment(admin, "sleepy").replicas == 1 and ready_count(admin, "sleepy") == 1,
                   "scaled back down to 1", mesh_=cluster)
    events = admin.stub.Describe(mesh.DescribeRequest(kind="deployment", name="sleepy")).events
    assert any("autoscaled 1 ->" in e for e in events), events       # up, with its reason
    assert any("autoscaled" in e and "-> 1:" in e for e in events), events   # and back down


def test_scale_to_zero_and_the_first_call_wakes_it(cluster, tmp_path):
    admin, proxy = one_node_mesh(cluster, tmp_path)
    admin.apply(sleeper_yaml("napper", """  min_replicas: 0
  max_replicas: 2
  target_in_flight: 2
  stable_window_s: 4
  panic_window_s: 1
  downscale_delay_s: 2
  scale_to_zero_after_s: 3
""", replicas=1))
    admin.wait_for(lambda: ready_count(admin, "napper") == 1, "1 ready replica", mesh_=cluster)
    admin.wait_for(lambda: deployment(admin, "napper").replicas == 0 and not admin.replicas("napper"),
                   "scaled to zero", mesh_=cluster)
    assert "scaling to zero" in deployment(admin, "napper").last_scaling

    with InferenceClient(proxy, timeout=90, retries=0) as client:   # a stream wakes it: held, then forwarded
        started = time.monotonic()
        responses = [response["DONE_MS"].tolist() for response in client.stream("sleeper", INPUTS, timeout=90)]
        cold_start_s = time.monotonic() - started
        assert responses == [[DELAY_MS]]
        assert deployment(admin, "napper").replicas >= 1
        print(f"cold start through the proxy: {cold_start_s:.1f}s")

        admin.wait_for(lambda: deployment(admin, "napper").replicas == 0 and not admin.replicas("napper"),
                       "scaled to zero again", mesh_=cluster)
        out = client.infer("sleeper", INPUTS)                             # and a unary call wakes it too
    assert out["DONE_MS"].tolist() == [DELAY_MS]


def test_a_model_at_zero_without_autoscaling_says_so(cluster, tmp_path):
    admin, proxy = one_node_mesh(cluster, tmp_path)
    admin.apply(sleeper_yaml("fixed", None, replicas=0))
    admin.wait_for(lambda: deployment(admin, "fixed").replicas == 0, "0 replicas", mesh_=cluster)
    with InferenceClient(proxy, timeout=10, retries=0) as client:
        deadline = time.monotonic() + 30
        while True:
            with pytest.raises(MeshError) as refused:
                client.infer("sleeper", INPUTS)
            # The proxy learns routes from the scheduler's stream, a moment after the
            # apply: until then it has no table, or one without this model.
            learning = "no route table" in str(refused.value) or refused.value.code == grpc.StatusCode.NOT_FOUND
            if not learning or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE, refused.value
    assert "no autoscaling" in str(refused.value) and "scale fixed" in str(refused.value)
