"""Placement: where replicas run. A pure library over a ``Snapshot`` of the nodes: no I/O.

    snapshot = Snapshot.from_nodes(node_views)        # from the agents' reports
    results = place(snapshot, requests)              # Placement | Unschedulable each, in order
    gang = place_gang(snapshot, stage_requests)      # list[Placement] on one node, or Unschedulable
    print(explain(results[0]))

``place`` and ``place_gang`` also take the node views themselves (a list of
``NodeView``) and build a throwaway snapshot from them.

Filters (in order): node_ready, node_selector, host_resources, gpu_memory.
Scores: gpu_memory, spread, pack, weighted per strategy (framework.DEFAULT_WEIGHTS).
``place`` books every placement in the snapshot, so the caller's snapshot
carries the reservations of what it placed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeAlias

from . import gang
from .framework import DEFAULT_WEIGHTS, Filter, Framework, Scorer, count_nodes
from .gpu_memory import GpuMemory
from .host_resources import HostResources
from .model import Decision, GiB, GpuView, MiB, NodeView, Placement, ReplicaRequest, Unschedulable, format_bytes
from .node_ready import NodeReady
from .node_selector import NodeSelector
from .pack import Pack
from .snapshot import Snapshot
from .spread import Spread

__all__ = ["DEFAULT_WEIGHTS", "Decision", "Filter", "Framework", "GiB", "GpuView", "MiB", "NodeView",
           "Placement", "ReplicaRequest", "Scorer", "Snapshot", "Unschedulable", "count_nodes",
           "default_framework", "explain", "explain_lines", "format_bytes", "place", "place_gang", "summary"]

Nodes: TypeAlias = Snapshot | Iterable[NodeView]


def default_framework() -> Framework:
    gpu_memory = GpuMemory()
    return Framework(filters=(NodeReady(), NodeSelector(), HostResources(), gpu_memory),
                     scorers=(gpu_memory, Spread(), Pack()), gpus=gpu_memory)


def place(snapshot: Nodes, requests: Iterable[ReplicaRequest],
          framework: Framework | None = None) -> list[Placement | Unschedulable]:
    """Place each request in order; each placement is booked before the next is judged."""
    return (framework or default_framework()).place(_snapshot(snapshot), requests)


def place_gang(snapshot: Nodes, requests: Iterable[ReplicaRequest],
               framework: Framework | None = None) -> list[Placement] | Unschedulable:
    """All of ``requests`` on one node, or none of them (``Unschedulable`` for the first)."""
    return gang.place_gang(framework or default_framework(), _snapshot(snapshot), requests)


def explain(result: Placement | Unschedulable) -> str:
    """Why a replica is where it is, or why it is nowhere (then one line per node)."""
    return result.explain()


def explain_lines(result: Placement | Unschedulable, limit: int | None = None) -> list[str]:
    """``explain`` as lines; ``limit`` caps the per-node lines of an unschedulable result."""
    lines = result.explain().splitlines()
    if limit is not None and len(lines) > limit + 1:
        lines = lines[:limit + 1] + [f"  ... and {len(lines) - 1 - limit} more nodes"]
    return lines


def summary(result: Placement | Unschedulable) -> str:
    """One line: ``no node: 3 nodes lack 40 GiB free on one GPU; 1 node cordoned``, or the decision."""
    return result.reasons if isinstance(result, Unschedulable) else result.explain()


def _snapshot(nodes: Nodes) -> Snapshot:
    return nodes if isinstance(nodes, Snapshot) else Snapshot.from_nodes(nodes)
