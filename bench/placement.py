"""Placement engine, measured: decisions per second on a simulated cluster, and report ingestion cost.

    .venv/bin/python -m bench.placement [--nodes 1000] [--gpus 8] [--replicas 10000] [--seed 0] [--quick]

A seeded cluster (default 1,000 nodes x 8 GPUs of 80 GiB, some memory in
use or reserved, a few nodes cordoned or lost, zone labels) takes a seeded
workload (default 10,000 replicas in deployments of mixed sizes: 4/10/20/40/80
GiB on one GPU, some on two, a few CPU only, some with a zone selector, a few
asking for a zone that does not exist). Figures:

- decisions per second of ``place`` over the whole batch (every request
  judged against every node), per-decision p50/p99;
- placed vs unschedulable; GPUs, and nodes' CPU or memory, overcommitted,
  re-counted from scratch from the original reports (must be 0);
- packing efficiency: ceil(placed GPU memory / GPU size) over the GPUs the
  placements touched (1.0 is perfect), side by side for the same workload
  placed all ``pack`` vs all ``spread`` (and the most replicas of one
  deployment on one node, which spread keeps low);
- vectorized filters vs the same filters' per-node ``check``, on a sample
  of requests (results must agree);
- ingestion: rebuilding the ``Snapshot`` from every node's report (what each
  placement pass does), as a share of one core at one pass a second, beside
  copying a built one.

Human lines first; the last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

if __package__ in (None, ""):   # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshserve.scheduler.placement import (
    GiB,
    GpuView,
    MiB,
    NodeView,
    Placement,
    ReplicaRequest,
    Snapshot,
    default_framework,
)

GPU_SIZE = 80 * GiB
ZONES = ("zone-a", "zone-b", "zone-c", "zone-d")
SIZES_GIB = (4, 10, 20, 40, 80)


def make_cluster(rng: np.random.Generator, nodes: int, gpus: int) -> list[NodeView]:
    views = []
    for n in range(nodes):
        name = f"node-{n:04d}"
        used = np.where(rng.random(gpus) < 0.3, rng.integers(1, 60 * 1024, gpus) * MiB, 0)
        reserved = np.where(rng.random(gpus) < 0.05, rng.integers(1, 10 * 1024, gpus) * MiB, 0)
        gpu_views = [GpuView(index=i, uuid=f"GPU-{n:04d}-{i}", memory_total=GPU_SIZE,
                             memory_free=GPU_SIZE - int(used[i]), reserved=int(reserved[i]))
                     for i in range(gpus)]
        state = rng.random()
        views.append(NodeView(name=name, labels={"zone": ZONES[n % len(ZONES)], "gpu": "a100-80gb"},
                              gpus=gpu_views, cpu_free=float(64 - rng.integers(0, 16)),
                              memory_free=int(512 - rng.integers(0, 128)) * GiB,
                              cordoned=state < 0.01, ready=not 0.01 <= state < 0.02))
    return views


def make_workload(rng: np.random.Generator, replicas: int) -> list[ReplicaRequest]:
    requests: list[ReplicaRequest] = []
    d = 0
    while len(requests) < replicas:
        count = int(rng.integers(1, 41))
        size = int(rng.choice(SIZES_GIB))
        kind = rng.random()
        gpus = 0 if kind < 0.03 else 2 if kind < 0.2 and size >= 20 else 1
        selector = {}
        pick = rng.random()
        if pick < 0.1:
            selector = {"zone": str(rng.choice(ZONES))}
        elif pick < 0.11:
            selector = {"zone": "zone-e"}            # a typo: nothing matches
        strategy = "pack" if rng.random() < 0.5 else "spread"
        for r in range(min(count, replicas - len(requests))):
            requests.append(ReplicaRequest(
                replica_id=f"dep-{d:04d}-{r}", deployment=f"dep-{d:04d}", gpus=gpus,
                gpu_memory=size * GiB if gpus else 0, cpu=float(rng.integers(1, 5)),
                memory=int(rng.integers(8, 65)) * GiB, node_selector=selector, strategy=strategy))
        d += 1
    order = rng.permutation(len(requests))                 # deployments arrive interleaved
    return [requests[i] for i in order]


def verify(views: list[NodeView], requests: list[ReplicaRequest], results) -> dict:
    """Re-count every booking from the original reports, without the snapshot."""
    by_name = {view.name: view for view in views}
    gpu_load: Counter = Counter()
    cpu_load: Counter = Counter()
    memory_load: Counter = Counter()
    violations = 0
    for request, result in zip(requests, results, strict=True):
        if not isinstance(result, Placement):
            continue
        view = by_name[result.node]
        if not view.ready or view.cordoned:
            violations += 1
        if any(view.labels.get(k) != v for k, v in request.node_selector.items()):
            violations += 1
        if len(set(result.gpu_indices)) != request.gpus:
            violations += 1
        for index in result.gpu_indices:
            gpu_load[(result.node, index)] += request.gpu_memory
        cpu_load[result.node] += request.cpu
        memory_load[result.node] += request.memory
    gpus = {(view.name, gpu.index): gpu for view in views for gpu in view.gpus}
    overcommitted = sum(1 for key, load in gpu_load.items() if load > gpus[key].memory_free - gpus[key].reserved)
    hosts_over = sum(1 for name in cpu_load if cpu_load[name] > by_name[name].cpu_free + 1e-6
                     or memory_load[name] > by_name[name].memory_free)
    placed_bytes = sum(r.gpus * r.gpu_memory for r, res in zip(requests, results, strict=True) if isinstance(res, Placement))
    lower_bound = math.ceil(placed_bytes / GPU_SIZE)
    touched = len(gpu_load)
    per_node = Counter((r.deployment, res.node) for r, res in zip(requests, results, strict=True) if isinstance(res, Placement))
    return {"gpus_overcommitted": overcommitted, "hosts_overcommitted": hosts_over,
            "rule_violations": violations, "gpus_touched": touched, "gpus_lower_bound": lower_bound,
            "packing_efficiency": round(lower_bound / touched, 3) if touched else None,
            "nodes_touched": len({node for node, _ in gpu_load}),
            "max_replicas_of_a_deployment_on_one_node": max(per_node.values(), default=0)}


def run_batch(views, requests) -> dict:
    framework = default_framework()
    snapshot = Snapshot.from_nodes(views)
    latencies = np.empty(len(requests))
    results = []
    start = time.perf_counter()
    for i, request in enumerate(requests):
        t = time.perf_counter()
        results.append(framework.place_one(snapshot, request))
        latencies[i] = time.perf_counter() - t
    elapsed = time.perf_counter() - start
    placed = sum(isinstance(result, Placement) for result in results)
    figures = {"requests": len(requests), "placed": placed, "unschedulable": len(requests) - placed,
               "seconds": round(elapsed, 3), "decisions_per_s": round(len(requests) / elapsed),
               "placements_per_s": round(placed / elapsed),
               "p50_us": round(float(np.percentile(latencies, 50)) * 1e6, 1),
               "p99_us": round(float(np.percentile(latencies, 99)) * 1e6, 1)}
    figures.update(verify(views, requests, results))
    return figures, results


def filters_side_by_side(views, requests) -> dict:
    """The pipeline's numpy masks vs each filter's per-node check, on the same requests."""
    framework = default_framework()
    snapshot = Snapshot.from_nodes(views)
    start = time.perf_counter()
    vectorized = [np.flatnonzero(_and(framework.filter(snapshot, r), len(snapshot))) for r in requests]
    t_vector = time.perf_counter() - start
    start = time.perf_counter()
    scalar = [[row for row in range(len(snapshot))
               if all(f.check(snapshot, r, row) is None for f in framework.filters)] for r in requests]
    t_scalar = time.perf_counter() - start
    mismatches = sum(list(v) != s for v, s in zip(vectorized, scalar, strict=True))
    return {"requests": len(requests), "vectorized_us": round(t_vector / len(requests) * 1e6, 1),
            "per_node_check_us": round(t_scalar / len(requests) * 1e6, 1),
            "speedup": round(t_scalar / t_vector, 1), "mismatches": mismatches}


def _and(masks, n):
    out = np.ones(n, np.bool_)
    for mask in masks:
        if mask is not None:
            out &= mask
    return out


def ingestion(views, rounds: int) -> dict:
    """Cost of a placement pass's snapshot: rebuilt from every node's report (what the scheduler
    does), beside copying a ready one (the floor for any kept-fresh snapshot, before its updates)."""
    rebuild, copy = [], []
    snapshot = Snapshot.from_nodes(views)
    for _ in range(rounds):
        start = time.perf_counter()
        Snapshot.from_nodes(views)
        rebuild.append(time.perf_counter() - start)
        start = time.perf_counter()
        snapshot.copy()
        copy.append(time.perf_counter() - start)
    rebuild_s, copy_s = float(np.median(rebuild)), float(np.median(copy))
    return {"reports": len(views), "gpus_per_report": len(views[0].gpus) if views else 0,
            "rebuild_ms": round(rebuild_s * 1e3, 2), "copy_ms": round(copy_s * 1e3, 2),
            "rebuild_core_pct_at_1hz": round(rebuild_s * 100, 2),
            "rebuild_over_copy": round(rebuild_s / copy_s, 1) if copy_s else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--replicas", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 50 nodes, 500 replicas")
    args = parser.parse_args(argv)
    if args.quick:
        args.nodes, args.replicas = 50, 500
    sample = 20 if args.quick else 100

    rng = np.random.default_rng(args.seed)
    views = make_cluster(rng, args.nodes, args.gpus)
    requests = make_workload(rng, args.replicas)
    gpus_total = sum(len(view.gpus) for view in views)
    print(f"cluster: {args.nodes} nodes x {args.gpus} GPUs of 80 GiB; {len(requests)} replicas "
          f"asking {sum(r.gpus * r.gpu_memory for r in requests) / GiB:,.0f} GiB of GPU memory "
          f"({sum(r.gpus * r.gpu_memory for r in requests) / (gpus_total * GPU_SIZE):.0%} of the cluster)")

    mixed, _ = run_batch(views, requests)
    print(f"mixed (as asked):  {mixed['decisions_per_s']:>7} decisions/s  {mixed['placements_per_s']:>7} "
          f"placements/s  p50 {mixed['p50_us']} us  p99 {mixed['p99_us']} us")
    print(f"  placed {mixed['placed']}, unschedulable {mixed['unschedulable']}; overcommitted: "
          f"{mixed['gpus_overcommitted']} GPUs, {mixed['hosts_overcommitted']} hosts; "
          f"rule violations {mixed['rule_violations']}")
    sides = {}
    for strategy in ("pack", "spread"):
        sides[strategy], _ = run_batch(views, [replace(r, strategy=strategy) for r in requests])
    for name, figures in (("mixed", mixed), *sides.items()):
        print(f"  {name:<7} packing efficiency {figures['packing_efficiency']} "
              f"({figures['gpus_lower_bound']} GPUs needed at best / {figures['gpus_touched']} touched, "
              f"{figures['nodes_touched']} nodes); most replicas of one deployment on a node: "
              f"{figures['max_replicas_of_a_deployment_on_one_node']}")
    filters = filters_side_by_side(views, requests[:sample])
    print(f"filters over {args.nodes} nodes: vectorized {filters['vectorized_us']} us vs per-node check "
          f"{filters['per_node_check_us']} us per request ({filters['speedup']}x), mismatches {filters['mismatches']}")
    ingest = ingestion(views, rounds=3 if args.quick else 5)
    print(f"snapshot of {ingest['reports']} reports: rebuild {ingest['rebuild_ms']} ms "
          f"({ingest['rebuild_core_pct_at_1hz']}% of a core at one pass a second), copy {ingest['copy_ms']} ms")

    figures = {"benchmark": "placement", "nodes": args.nodes, "gpus_per_node": args.gpus,
               "replicas": len(requests), "seed": args.seed,
               "placements_per_s": mixed["placements_per_s"], "decisions_per_s": mixed["decisions_per_s"],
               "placed": mixed["placed"], "unschedulable": mixed["unschedulable"],
               "gpus_overcommitted": mixed["gpus_overcommitted"],
               "hosts_overcommitted": mixed["hosts_overcommitted"],
               "packing_efficiency": mixed["packing_efficiency"],
               "mixed": mixed, "pack": sides["pack"], "spread": sides["spread"],
               "ratios": {"pack_over_spread_packing_efficiency":
                          round(sides["pack"]["packing_efficiency"] / sides["spread"]["packing_efficiency"], 2)
                          if sides["pack"]["packing_efficiency"] and sides["spread"]["packing_efficiency"] else None,
                          "vectorized_over_per_node_filters": filters["speedup"]},
               "filters": filters, "ingestion": ingest}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
