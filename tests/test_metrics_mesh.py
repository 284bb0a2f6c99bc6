"""Every control-plane /metrics endpoint of a real mesh (scheduler, node agents, and the replicas the
agents re-export), scraped over HTTP and parsed with prometheus_client's text parser, against the
fake GPUs given, the deployments applied and the calls made."""

from __future__ import annotations

import numpy as np
from mesh_harness import START_TIMEOUT_S, Admin, Mesh, deployment_yaml
from metrics_scrape import Scrape

from meshserve.clients import InferenceClient
from meshserve.common.ready_line import parse_metrics_address
from meshserve.common.sizes import parse_size

METRICS = ("--metrics-listen", "127.0.0.1:0")
GIB = parse_size("1GiB")
CALLS = 5


def metrics_address(process, admin: Admin) -> str:
    """The address in the process's "metrics on http://..." line (port 0 picked by the kernel)."""
    return admin.wait_for(lambda: next(filter(None, map(parse_metrics_address, list(process.output))), None),
                          f"{process.name}'s metrics address", START_TIMEOUT_S)


def ready(admin: Admin, deployment: str, count: int):
    replicas = admin.replicas(deployment)
    return replicas if len(replicas) == count and all(r.state == "ready" for r in replicas) else None


def test_scheduler_agents_and_replicas_export_what_happened(cluster: Mesh, tmp_path):
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1", extra_args=METRICS)
    agents = {"node-a": cluster.agent("node-a", scheduler.address, fake_gpus="2x80GiB", extra_args=METRICS),
              "node-b": cluster.agent("node-b", scheduler.address, fake_gpus="1x24GiB", extra_args=METRICS)}
    admin = Admin(scheduler.address)
    admin.wait_for(lambda: len([n for n in admin.nodes() if n.state == "ready"]) == 2, "2 nodes", mesh_=cluster)
    admin.apply(deployment_yaml("adder", replicas=3, gpu_memory="10GiB"))
    admin.apply(deployment_yaml("huge", replicas=1, gpu_memory="100GiB"))   # fits no GPU: stays pending
    replicas = admin.wait_for(lambda: ready(admin, "adder", 3), "3 ready replicas", mesh_=cluster)
    a = np.arange(16, dtype=np.float32)[None, :]
    with InferenceClient(replicas[0].address, timeout=10) as client:
        for _ in range(CALLS):
            client.infer("add_sub", {"INPUT0": a, "INPUT1": a})

    s = Scrape.of(metrics_address(scheduler, admin))
    assert s.value("meshserve_scheduler_leader") == 1
    assert s.value("meshserve_scheduler_agents_connected") == 2
    assert s.value("meshserve_scheduler_placements") == 3
    assert s.value("meshserve_scheduler_replicas", deployment="adder", state="ready") == 3
    assert s.value("meshserve_scheduler_replicas", deployment="huge", state="pending") == 1
    pending = s.samples("meshserve_scheduler_pending_replicas")
    assert len(pending) == 1 and pending[0].value == 1 and pending[0].labels["reason"]
    assert s.value("meshserve_scheduler_reconcile_duration_seconds_count") >= 1
    assert s.value("meshserve_scheduler_store_request_duration_seconds_count", op="txn") >= 1

    for name, agent in agents.items():
        scrape = Scrape.of(metrics_address(agent, admin))
        on_node = [r for r in replicas if r.node == name]
        totals = {sample.labels["gpu"]: sample.value for sample in scrape.samples("nv_gpu_memory_total_bytes")}
        assert totals == ({"0": 80 * GIB, "1": 80 * GIB} if name == "node-a" else {"0": 24 * GIB})
        for gpu in totals:
            expected = 10 * GIB * sum(1 for r in on_node if int(gpu) in r.gpu_indices)
            assert scrape.value("nv_gpu_memory_used_bytes", node=name, gpu=gpu) == expected
            assert scrape.value("nv_gpu_utilization", node=name, gpu=gpu) == 0
        for replica in on_node:
            assert scrape.value("meshserve_agent_replica_restarts", node=name, replica=replica.id) == 0
            called = CALLS if replica.id == replicas[0].id else 0
            assert scrape.value("nv_inference_request_success", model="add_sub", version="1", node=name,
                                replica=replica.id) == called
            assert scrape.value("nv_inference_request_failure", model="add_sub", node=name,
                                replica=replica.id) == 0
        assert scrape.value("meshserve_agent_replicas", node=name, state="ready") == len(on_node)
    admin.close()


def test_a_crashed_replica_counts_one_restart_on_its_agent(cluster: Mesh, tmp_path):
    from mesh_harness import REPO_ROOT

    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    agent = cluster.agent("node-a", scheduler.address, extra_args=METRICS)
    admin = Admin(scheduler.address)
    admin.apply(f"""kind: Deployment
name: crashy
model:
  repository: {REPO_ROOT / 'tests' / 'models' / 'agent'}
  name: crasher
replicas: 1
resources:
  gpus: 0
  cpu: 100m
""")
    (replica,) = admin.wait_for(lambda: ready(admin, "crashy", 1), "a ready crasher", mesh_=cluster)
    address = metrics_address(agent, admin)
    assert Scrape.of(address).value("meshserve_agent_replica_restarts", replica=replica.id) == 0
    with InferenceClient(replica.address, timeout=10) as client:
        try:
            client.infer("crasher", {"CODE": np.array([3], dtype=np.int32)})
        except Exception:   # the process exits mid-call: whatever error the client sees
            pass
    admin.wait_for(lambda: Scrape.of(address).value("meshserve_agent_replica_restarts", replica=replica.id) == 1,
                   "one restart in the agent's metrics", mesh_=cluster)
    admin.close()
