"""Gang placement: a group of replicas (a pipeline's stages) all on ONE node, or none.

A node qualifies when every member passes every filter there alone and the
group fits there together: summed CPU and memory, and a GPU assignment for
all members at once. GPUs may be shared between members (memory is the
currency); members are assigned largest first, each to the GPUs the group
already uses where they fit, else best fit, so a group that fits on one GPU
lands on one GPU. That assignment is a heuristic (first fit
decreasing), so a node where only an exotic packing works can be missed; a
gang it returns never overcommits a GPU.

Qualifying nodes are tried in the order the framework scores them for the
gang's largest member; the first where the group fits gets it. Nothing is
booked unless every member is placed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .framework import Framework, LazyReasons, LazyRejections, all_of, unschedulable
from .host_resources import CPU_EPSILON
from .model import Placement, ReplicaRequest, Unschedulable, format_bytes
from .snapshot import Snapshot


def place_gang(framework: Framework, snapshot: Snapshot,
               requests: Iterable[ReplicaRequest]) -> list[Placement] | Unschedulable:
    members = list(requests)
    if not members:
        return []
    masks = [framework.filter(snapshot, member) for member in members]
    alone = all_of([all_of(member_masks, len(snapshot)) for member_masks in masks], len(snapshot))
    together = alone & _sums_fit(snapshot, members)
    rows = np.flatnonzero(together)
    if rows.size:
        anchor = max(range(len(members)), key=lambda i: (_gpu_bytes([members[i]]), -i))
        total, scores = framework.score(snapshot, members[anchor], rows)
        for position in np.lexsort((rows, -total)).tolist():     # best score first, then name
            row = int(rows[position])
            assignment = fit_together(snapshot, row, members)
            if assignment is not None:
                return _book(framework, snapshot, members, members[anchor], rows, total, scores, position,
                             assignment)
    return _unschedulable(framework, snapshot, members, masks, alone)


def fit_together(snapshot: Snapshot, row: int, members: Sequence[ReplicaRequest]) -> list[tuple[int, ...]] | None:
    """GPU slots per member on ``row``, or None if they do not fit: largest member first, onto
    GPUs the group already uses where it can, else best fit."""
    avail = snapshot.gpu_avail[row, :int(snapshot.gpu_count[row])].tolist()
    used: set[int] = set()
    assignment: list[tuple[int, ...]] = [()] * len(members)
    for i in sorted(range(len(members)), key=lambda i: (-members[i].gpu_memory, -members[i].gpus, i)):
        member = members[i]
        if member.gpus == 0:
            continue
        fitting = sorted((slot for slot, a in enumerate(avail) if a >= member.gpu_memory),
                         key=lambda slot: (slot not in used, avail[slot]))
        if len(fitting) < member.gpus:
            return None
        for slot in fitting[:member.gpus]:
            avail[slot] -= member.gpu_memory
            used.add(slot)
        assignment[i] = tuple(sorted(fitting[:member.gpus]))
    return assignment


def _gpu_bytes(members: Sequence[ReplicaRequest]) -> int:
    return sum(member.gpus * member.gpu_memory for member in members)


def _sums_fit(snapshot: Snapshot, members: Sequence[ReplicaRequest]) -> np.ndarray:
    cpu = sum(member.cpu for member in members)
    memory = sum(member.memory for member in members)
    fits: np.ndarray = ((snapshot.cpu_free + CPU_EPSILON >= cpu) & (snapshot.memory_free >= memory)
                        & (snapshot.gpu_avail_sum >= _gpu_bytes(members)))
    return fits


def _book(framework: Framework, snapshot: Snapshot, members: Sequence[ReplicaRequest], anchor: ReplicaRequest,
          rows: np.ndarray, total: np.ndarray, scores: Mapping[str, np.ndarray], position: int,
          assignment: Sequence[tuple[int, ...]]) -> list[Placement]:
    ids = ", ".join(member.replica_id for member in members)
    context = f"gang of {len(members)} ({ids}) on one node, all or nothing"
    row, placements = int(rows[position]), []
    for member, slots in zip(members, assignment, strict=True):    # notes read what earlier members booked
        decision = framework.decision(snapshot, member, rows, total, scores, position, slots, context, anchor)
        snapshot.reserve(row, slots, member)
        placements.append(Placement(member.replica_id, decision.node, decision.gpu_indices, decision))
    return placements


def _unschedulable(framework: Framework, snapshot: Snapshot, members: Sequence[ReplicaRequest],
                   masks: Sequence[Sequence[np.ndarray | None]], alone: np.ndarray) -> Unschedulable:
    """Each node is charged to the first member and filter that rejected it; nodes every
    member passes alone cannot hold the group together."""
    remaining = np.ones(len(snapshot), np.bool_)
    groups, details = [], []
    for member, member_masks in zip(members, masks, strict=True):
        member_groups, member_details = framework.rejections(snapshot, member, member_masks, remaining,
                                                             prefix=f"{member.replica_id}: ")
        groups += member_groups
        details += member_details
    rows = np.flatnonzero(alone)
    if rows.size:
        groups.append((f"cannot hold all {len(members)} together", rows.size))
        cpu_free, memory_free = snapshot.cpu_free[rows], snapshot.memory_free[rows]      # copies
        details.append((rows, LazyReasons(rows.size, lambda i: _why_apart(
            members, float(cpu_free[i]), int(memory_free[i]))), ""))
    subject = f"no node for gang {', '.join(member.replica_id for member in members)}"
    return unschedulable(members[0].replica_id, subject, groups, LazyRejections(snapshot.names, details))


def _why_apart(members: Sequence[ReplicaRequest], cpu_free: float, memory_free: int) -> str:
    cpu = sum(member.cpu for member in members)
    memory = sum(member.memory for member in members)
    if cpu_free + CPU_EPSILON < cpu:
        return f"the gang needs {cpu:g} CPUs together, {cpu_free:g} free"
    if memory_free < memory:
        return f"the gang needs {format_bytes(memory)} host memory together, {format_bytes(memory_free)} free"
    needs = " + ".join(f"{m.gpus}x{format_bytes(m.gpu_memory)}" for m in members if m.gpus)
    return f"its GPUs cannot hold the gang's GPU memory together ({needs})"
