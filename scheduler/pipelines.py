"""Placing a pipeline replica: all its steps on one host, or split across the fewest.

A pipeline replica is a group of replica records led by the one that serves
the pipeline's own (ensemble) model. ``colocate``:

- ``required``: the whole group on one node (one GPU where memory allows),
  as one all-or-nothing decision, in ONE runtime process that serves every
  step model and the ensemble, so tensors pass between steps in memory.
  If no node fits, the replica waits and ``explain`` says why.
- ``preferred``: as required when a node fits; otherwise each step is
  placed on its own, and ``explain`` says what was split and why. The
  leader serves the ensemble and the first step; the others run as their
  own processes and the leader reaches them over gRPC (``--remote-model``).
- ``none``: always split.

Only pending leaders are placed here; a split group's step replicas are
created already placed.
"""

from __future__ import annotations

from collections.abc import Callable

from . import placement
from .cluster import Cluster
from .needs import Needs
from .records import PLACED, ReplicaRecord
from .spec import DeploymentSpec

EXPLAIN_LINES_KEPT = 20


def step_needs(spec: DeploymentSpec) -> list[tuple[str, Needs]]:
    """(model, needs) per step; the pipeline's own resources ride with the first step."""
    own = spec.resources
    steps = []
    for index, step in enumerate(spec.steps):
        needs = Needs.of(step.resources, spec.placement)
        if index == 0:
            needs = Needs(gpus=max(needs.gpus, own.gpus), gpu_memory=max(needs.gpu_memory, own.gpu_memory),
                          cpu=needs.cpu + own.cpu, memory=needs.memory + own.memory,
                          node_selector=needs.node_selector, strategy=needs.strategy)
        steps.append((step.model, needs))
    return steps


def _request(replica_id: str, deployment: str, needs: Needs) -> placement.ReplicaRequest:
    return placement.ReplicaRequest(replica_id=replica_id, deployment=deployment, gpus=needs.gpus,
                                    gpu_memory=needs.gpu_memory, cpu=needs.cpu, memory=needs.memory,
                                    node_selector=needs.node_selector, strategy=needs.strategy)


def place_pipeline(cluster: Cluster, snapshot: placement.Snapshot, leader: ReplicaRecord, spec: DeploymentSpec,
                   new_id: Callable[[str], str]) -> list[ReplicaRecord]:
    """Place one pending pipeline leader; returns every record created or changed."""
    ensemble = spec.model.name
    steps = step_needs(spec)
    requests = [_request(f"{leader.id}/{model}", leader.deployment, needs) for model, needs in steps]
    mode = spec.colocate
    gang_result = placement.place_gang(snapshot, requests) if mode != "none" else None
    if isinstance(gang_result, list):
        node = gang_result[0].node
        gpus = sorted({gpu for result in gang_result for gpu in result.gpu_indices})
        _place(leader, node, gpus, max((n.gpu_memory for _, n in steps), default=0))
        leader.models = [ensemble] + [model for model, _ in steps]
        leader.remote, leader.group = {}, leader.id
        leader.decision = [f"co-located: all {len(steps)} steps and the pipeline on {node} "
                           f"GPU {','.join(map(str, gpus)) or '-'}, in one process (tensors stay in memory)"]
        leader.decision += placement.explain_lines(gang_result[0], limit=EXPLAIN_LINES_KEPT)
        cluster.record_event(f"replica/{leader.id}", f"placed co-located on {node}")
        return [leader]
    if mode == "required" and gang_result is not None:   # (never None when required)
        reason = f"waiting: colocate is required and {placement.summary(gang_result)}"
        if reason == leader.reason:
            return []
        leader.reason = reason
        leader.decision = [f"not placed: all {len(steps)} steps must share one node "
                           f"(colocate: required)"] + placement.explain_lines(gang_result, limit=EXPLAIN_LINES_KEPT)
        cluster.record_event(f"replica/{leader.id}", leader.reason)
        return [leader]

    results = placement.place(snapshot, requests)
    missing = [model for (model, _), result in zip(steps, results, strict=True)
               if not isinstance(result, placement.Placement)]
    if missing:
        reason = f"cannot place step {', '.join(missing)} anywhere: " + "; ".join(
            placement.summary(r) for r in results if not isinstance(r, placement.Placement))
        # The steps that did fit stay booked in this pass's snapshot only: conservative for the
        # rest of the pass, and the next pass builds a new snapshot from the reports.
        if reason == leader.reason:
            return []
        leader.reason = reason
        leader.decision = [reason]
        return [leader]
    placed = [result for result in results if isinstance(result, placement.Placement)]   # all of them
    why = "colocate: none" if gang_result is None else \
        f"no single node fits every step ({placement.summary(gang_result)})"
    changed = []
    (first_model, first_needs), first = steps[0], placed[0]
    _place(leader, first.node, list(first.gpu_indices), first_needs.gpu_memory)
    leader.models, leader.group, leader.remote = [ensemble, first_model], leader.id, {}
    lines = [f"split across {len({r.node for r in placed})} node(s) because {why}:",
             f"  pipeline + step {first_model} on {first.node}"]
    for (model, needs), result in zip(steps[1:], placed[1:], strict=True):
        step = ReplicaRecord(id=new_id(leader.deployment), deployment=leader.deployment,
                             revision=leader.revision, models=[model], group=leader.id)
        _place(step, result.node, list(result.gpu_indices), needs.gpu_memory)
        step.decision = [f"step {model} of pipeline replica {leader.id}"] + placement.explain_lines(result)
        cluster.replicas[step.id] = step
        leader.remote[model] = step.id
        lines.append(f"  step {model} on {result.node} (replica {step.id}; reached over gRPC)")
        changed.append(step)
    leader.decision = lines
    cluster.record_event(f"replica/{leader.id}", lines[0])
    return [leader] + changed


def _place(record: ReplicaRecord, node: str, gpus: list[int], gpu_memory: int) -> None:
    record.state, record.node, record.gpu_indices, record.reason = PLACED, node, gpus, ""
    record.gpu_memory_bytes = gpu_memory
