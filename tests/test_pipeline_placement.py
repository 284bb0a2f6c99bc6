"""Placing pipeline replicas on fake nodes: gang on one host, wait, or split with an explanation."""

from __future__ import annotations

import collections
import itertools

from meshserve.scheduler import placement
from meshserve.scheduler.cluster import Cluster
from meshserve.scheduler.pipelines import place_pipeline
from meshserve.scheduler.records import PENDING, PLACED, ReplicaRecord
from meshserve.scheduler.spec import DeploymentSpec

GiB = 1 << 30


def node(name: str, *gpu_free_gib: int, cpu: float = 8.0) -> placement.NodeView:
    gpus = [placement.GpuView(index=i, uuid=f"{name}-{i}", memory_total=80 * GiB, memory_free=free * GiB)
            for i, free in enumerate(gpu_free_gib)]
    return placement.NodeView(name=name, labels={}, gpus=gpus, cpu_free=cpu, memory_free=64 * GiB,
                              replicas=collections.Counter())


def spec(colocate: str, *step_gpu_gib: int) -> DeploymentSpec:
    return DeploymentSpec.from_dict({
        "kind": "Pipeline", "name": "pipe", "model": {"repository": "/r", "name": "pipe"},
        "resources": {"cpu": 0.1}, "placement": {"strategy": "spread"}, "colocate": colocate,
        "steps": [{"model": f"step{i}", "resources": {"gpus": 1 if gib else 0, "gpu_memory": gib * GiB,
                                                      "cpu": 0.5}}
                  for i, gib in enumerate(step_gpu_gib)],
    })


def run(nodes, pipeline_spec):
    cluster = Cluster()
    leader = ReplicaRecord(id="pipe-leader", deployment="pipe", revision=1)
    cluster.replicas[leader.id] = leader
    counter = itertools.count()
    changed = place_pipeline(cluster, placement.Snapshot.from_nodes(nodes), leader, pipeline_spec,
                             lambda deployment: f"{deployment}-step{next(counter)}")
    return leader, changed, cluster


def test_steps_that_fit_one_gpu_share_it_in_one_process():
    leader, changed, _ = run([node("a", 10), node("b", 70)], spec("required", 20, 30))
    assert changed == [leader] and leader.state == PLACED and leader.node == "b"
    assert leader.gpu_indices == [0] and leader.models == ["pipe", "step0", "step1"] and leader.remote == {}
    assert "co-located" in leader.decision[0] and "in one process" in leader.decision[0]


def test_required_waits_when_no_node_fits_all_steps_and_says_why():
    leader, changed, _ = run([node("a", 40), node("b", 40)], spec("required", 30, 30))
    assert changed == [leader] and leader.state == PENDING and leader.node == ""
    assert "colocate is required" in leader.reason and "no node" in leader.reason
    again, changed_again, _ = run([node("a", 40), node("b", 40)], spec("required", 30, 30))
    assert again.reason == leader.reason


def test_preferred_splits_across_nodes_and_explains_what_and_why():
    leader, changed, cluster = run([node("a", 40), node("b", 40)], spec("preferred", 30, 30))
    step = changed[1]
    assert leader.state == PLACED and leader.models == ["pipe", "step0"]
    assert leader.remote == {"step1": step.id}
    assert step.models == ["step1"] and step.group == leader.id and not step.leads and step.state == PLACED
    assert {leader.node, step.node} == {"a", "b"}
    assert leader.decision[0].startswith("split across 2 node(s) because no single node fits every step")
    assert any("step step1 on" in line and "over gRPC" in line for line in leader.decision)
    assert cluster.replicas[step.id] is step


def test_none_always_splits_even_when_one_node_would_fit():
    leader, changed, _ = run([node("a", 80, 80)], spec("none", 10, 10))
    assert len(changed) == 2 and leader.decision[0].endswith("colocate: none:")
    assert leader.models == ["pipe", "step0"] and list(leader.remote) == ["step1"]


def test_a_gang_never_overcommits_a_gpu_across_replicas():
    snapshot = placement.Snapshot.from_nodes([node("a", 50)])
    cluster = Cluster()
    results = []
    for index in range(2):
        leader = ReplicaRecord(id=f"leader-{index}", deployment="pipe", revision=1)
        cluster.replicas[leader.id] = leader
        place_pipeline(cluster, snapshot, leader, spec("required", 20, 20), lambda d: "unused")
        results.append(leader)
    assert results[0].state == PLACED and results[1].state == PENDING  # 40 of 50 GiB taken by the first
