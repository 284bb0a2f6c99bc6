"""Fake node lists and requests shared by the placement tests (no tests here)."""

from __future__ import annotations

import random
from collections import Counter

from meshserve.scheduler.placement import GiB, GpuView, NodeView, Placement, ReplicaRequest


def gpu(index: int, free_gib: float, total_gib: float = 80, reserved_gib: float = 0, node: str = "n") -> GpuView:
    return GpuView(index=index, uuid=f"GPU-{node}-{index}", memory_total=int(total_gib * GiB),
                   memory_free=int(free_gib * GiB), reserved=int(reserved_gib * GiB))


def node(name: str, free_gib=(80,), *, reserved_gib=None, cpu: float = 32, memory_gib: int = 256,
         labels=None, cordoned=False, ready=True, replicas=None) -> NodeView:
    reserved_gib = reserved_gib or [0] * len(free_gib)
    return NodeView(name=name, labels=dict(labels or {}),
                    gpus=[gpu(i, free, reserved_gib=res, node=name)
                          # strict=False: random_cluster draws reservations for the most GPUs a node may have
                          for i, (free, res) in enumerate(zip(free_gib, reserved_gib, strict=False))],
                    cpu_free=cpu, memory_free=memory_gib * GiB, cordoned=cordoned, ready=ready,
                    replicas=Counter(replicas or {}))


def req(replica_id: str, deployment: str = "d", gpus: int = 1, gib: float = 10, *, cpu: float = 1,
        memory_gib: int = 4, selector=None, strategy: str = "spread") -> ReplicaRequest:
    return ReplicaRequest(replica_id=replica_id, deployment=deployment, gpus=gpus,
                          gpu_memory=int(gib * GiB) if gpus else 0, cpu=cpu, memory=memory_gib * GiB,
                          node_selector=dict(selector or {}), strategy=strategy)


def random_cluster(seed: int, nodes: int = 30, gpus: int = 4) -> list[NodeView]:
    rng = random.Random(seed)
    views = []
    for n in range(nodes):
        views.append(node(
            f"node-{n:02d}", [rng.choice([80, 80, 70, 40, 20, 5]) for _ in range(rng.randint(0, gpus))],
            reserved_gib=[rng.choice([0, 0, 0, 10, 30]) for _ in range(gpus)],
            cpu=rng.choice([2, 8, 32]), memory_gib=rng.choice([16, 64, 256]),
            labels={"zone": rng.choice("ab"), "gpu": rng.choice(["a100", "h100"])},
            cordoned=rng.random() < 0.1, ready=rng.random() > 0.1))
    return views


def random_requests(seed: int, n: int = 200) -> list[ReplicaRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        gpus = rng.choice([0, 1, 1, 1, 2, 3])
        out.append(req(f"r{i}", f"dep{rng.randint(0, 9)}", gpus, rng.choice([1, 4, 10, 20, 40, 80]),
                       cpu=rng.choice([0, 0.5, 1, 4]), memory_gib=rng.choice([0, 1, 8, 32]),
                       selector=rng.choice([{}, {}, {"zone": "a"}, {"gpu": "h100", "zone": "b"}, {"zone": "c"}]),
                       strategy=rng.choice(["spread", "pack"])))
    return out


def overcommitted(views: list[NodeView], requests, results) -> list[str]:
    """Re-count every booking from the original reports, without the snapshot: what broke."""
    by_name = {view.name: view for view in views}
    gpu_load: Counter = Counter()
    cpu_load: Counter = Counter()
    memory_load: Counter = Counter()
    broken = []
    for request, result in zip(requests, results, strict=True):
        if not isinstance(result, Placement):
            continue
        view = by_name[result.node]
        if not view.ready or view.cordoned:
            broken.append(f"{request.replica_id} on unschedulable {view.name}")
        if any(view.labels.get(k) != v for k, v in request.node_selector.items()):
            broken.append(f"{request.replica_id} ignores its selector on {view.name}")
        if len(set(result.gpu_indices)) != request.gpus:
            broken.append(f"{request.replica_id} got GPUs {result.gpu_indices}")
        for index in result.gpu_indices:
            gpu_load[(view.name, index)] += request.gpu_memory
        cpu_load[view.name] += request.cpu
        memory_load[view.name] += request.memory
    gpus = {(view.name, g.index): g for view in views for g in view.gpus}
    broken += [f"GPU {key} overcommitted" for key, load in gpu_load.items()
               if load > gpus[key].memory_free - gpus[key].reserved]
    broken += [f"{name} CPU overcommitted" for name, load in cpu_load.items() if load > by_name[name].cpu_free + 1e-6]
    broken += [f"{name} memory overcommitted" for name, load in memory_load.items()
               if load > by_name[name].memory_free]
    return broken
