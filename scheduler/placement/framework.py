"""The placement pipeline: filter every node, score the feasible ones, pick the best, book it.

Shaped like the Kubernetes scheduler framework. Each rule is a small plugin
that implements only the extension points it needs:

- a ``Filter`` says whether a node can take the replica at all. ``check``
  is the rule for one node (``None``: passes; otherwise the reason, as data);
  ``mask`` is the same rule over every node at once, in numpy, which is what
  placement runs; ``summarize`` counts rejected nodes per reason, and
  ``reasons`` captures why each rejected node said no;
- a ``Scorer`` rates each feasible node 0..1. A strategy's profile weights
  the scores; the node with the highest weighted mean wins, ties going to the
  smallest node name (rows are sorted by name, and ``argmax`` takes the first);
- the GPU plugin chooses which GPUs of the chosen node the replica gets.

Placing books the replica in the snapshot (GPU memory reserved, CPU and
memory taken, replica counted) before the next request is judged, so a batch
can never promise the same bytes twice. A replica that fits nowhere gets an
``Unschedulable`` naming how many nodes each filter turned away and why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, overload

import numpy as np

from .model import Decision, Placement, ReplicaRequest, Unschedulable
from .snapshot import Snapshot


class Filter:
    """A rule every node must pass. Override ``check``; override the others for speed."""

    name = "filter"

    def check(self, snapshot: Snapshot, request: ReplicaRequest, row: int) -> str | None:
        """``None`` if the node at ``row`` passes, otherwise why it does not."""
        raise NotImplementedError

    def mask(self, snapshot: Snapshot, request: ReplicaRequest) -> np.ndarray | None:
        """Per row, True where the node passes; ``None`` when every node passes. The caller
        never modifies it, so a plugin may return an array it keeps."""
        return np.fromiter((self.check(snapshot, request, row) is None for row in range(len(snapshot))),
                           np.bool_, count=len(snapshot))

    def summarize(self, snapshot: Snapshot, request: ReplicaRequest,
                  rows: np.ndarray) -> list[tuple[str, int]]:
        """Group the rejected ``rows`` by reason: ``[(reason, nodes)]``, each reason a plural
        predicate (``"lack 40 GiB free on one GPU"``; see ``count_nodes``)."""
        groups: dict[str, int] = {}
        for row in rows.tolist():
            reason = self.check(snapshot, request, row) or "rejected"
            groups[reason] = groups.get(reason, 0) + 1
        return list(groups.items())

    def reasons(self, snapshot: Snapshot, request: ReplicaRequest, rows: np.ndarray) -> Sequence[str]:
        """``check``'s answer for each rejected row. Reads the snapshot now; may format later
        (a ``LazyReasons`` over numbers copied now), so an unschedulable result stays cheap."""
        return [self.check(snapshot, request, row) or "rejected" for row in rows.tolist()]


class Scorer:
    """Rates feasible nodes 0..1, higher is better."""

    name = "scorer"

    def score(self, snapshot: Snapshot, request: ReplicaRequest, rows: np.ndarray) -> np.ndarray | None:
        """One score per row of ``rows``; ``None`` when this plugin has no opinion on the request."""
        raise NotImplementedError

    def note(self, snapshot: Snapshot, request: ReplicaRequest, row: int,
             slots: tuple[int, ...]) -> str | None:
        """What the score stands for on the chosen node, for ``explain`` (read before booking)."""
        return None


_SINGULAR = {"lack": "lacks", "do": "does", "are": "is", "have": "has"}


def count_nodes(n: int, reason: str) -> str:
    """``count_nodes(3, "lack 40 GiB free on one GPU")`` -> ``3 nodes lack ...``; 1 -> ``1 node lacks``."""
    if n == 1:
        verb, _, rest = reason.partition(" ")
        reason = " ".join(filter(None, (_SINGULAR.get(verb, verb), rest)))
    return f"{n} node{'' if n == 1 else 's'} {reason}"


class GpuAssigner(Protocol):
    def assign(self, snapshot: Snapshot, request: ReplicaRequest, row: int) -> tuple[int, ...]:
        """The GPU slots of ``row`` the replica gets (the node passed every filter)."""


DEFAULT_WEIGHTS: Mapping[str, Mapping[str, float]] = MappingProxyType({
    # spread: a deployment's replicas across hosts first (its weight outvotes the
    # GPU score whenever the counts differ), then the GPUs with the most headroom.
    "spread": MappingProxyType({"spread": 2.0, "gpu_memory": 1.0}),
    # pack: the fullest nodes first, then the tightest GPU fit; no spreading.
    "pack": MappingProxyType({"pack": 2.0, "gpu_memory": 1.0}),
})


@dataclass(frozen=True)
class Framework:
    filters: tuple[Filter, ...]
    scorers: tuple[Scorer, ...]
    gpus: GpuAssigner                 # chooses which GPUs of the chosen node
    weights: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: DEFAULT_WEIGHTS)
    # strategy -> scorer name -> weight; a scorer without a weight is skipped

    def place(self, snapshot: Snapshot, requests: Iterable[ReplicaRequest]) -> list[Placement | Unschedulable]:
        """Place each request in order, booking each placement before the next request."""
        return [self.place_one(snapshot, request) for request in requests]

    def place_one(self, snapshot: Snapshot, request: ReplicaRequest) -> Placement | Unschedulable:
        masks = self.filter(snapshot, request)
        rows = np.flatnonzero(all_of(masks, len(snapshot)))
        if rows.size == 0:
            return self.unschedulable(snapshot, request, masks)
        total, scores = self.score(snapshot, request, rows)
        best = int(np.argmax(total))
        slots = self.gpus.assign(snapshot, request, int(rows[best]))
        decision = self.decision(snapshot, request, rows, total, scores, best, slots)
        snapshot.reserve(int(rows[best]), slots, request)
        return Placement(request.replica_id, decision.node, decision.gpu_indices, decision)

    def filter(self, snapshot: Snapshot, request: ReplicaRequest) -> list[np.ndarray | None]:
        """Every filter's mask, in pipeline order."""
        return [plugin.mask(snapshot, request) for plugin in self.filters]

    def score(self, snapshot: Snapshot, request: ReplicaRequest,
              rows: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Weighted mean score per row of ``rows``, and each weighted plugin's own scores."""
        weights = self.weights[request.strategy]
        total: np.ndarray | None = None
        scores: dict[str, np.ndarray] = {}
        weight_sum = 0.0
        for plugin in self.scorers:
            weight = weights.get(plugin.name, 0.0)
            if weight <= 0:
                continue
            score = plugin.score(snapshot, request, rows)
            if score is None:
                continue
            scores[plugin.name] = score
            if total is None:
                total = weight * score
            else:
                total += weight * score
            weight_sum += weight
        if total is None:
            return np.zeros(rows.size), scores
        total /= weight_sum
        return total, scores

    def decision(self, snapshot: Snapshot, request: ReplicaRequest, rows: np.ndarray, total: np.ndarray,
                 scores: Mapping[str, np.ndarray], best: int, slots: tuple[int, ...], context: str = "",
                 scored_as: ReplicaRequest | None = None) -> Decision:
        """The record of choosing ``rows[best]`` (read before the placement is booked);
        ``scored_as``: the request the scores were computed for, if not this one (gangs)."""
        row = int(rows[best])
        runner_up = None
        if rows.size > 1:
            chosen = total[best]
            total[best] = -np.inf
            second = int(np.argmax(total))
            runner_up = (snapshot.names[rows[second]], float(total[second]))
            total[best] = chosen
        notes = {}
        for plugin in self.scorers:
            if plugin.name in scores:
                note = plugin.note(snapshot, request, row, slots)
                if note:
                    notes[plugin.name] = note
        weights = self.weights[(scored_as or request).strategy]
        index = snapshot.gpu_index[row]
        return Decision(
            replica_id=request.replica_id, node=snapshot.names[row],
            gpu_indices=tuple(sorted(int(index[slot]) for slot in slots)), strategy=request.strategy,
            scores={name: float(score[best]) for name, score in scores.items()},
            weights={name: weights[name] for name in scores}, total=float(total[best]),
            notes=notes, feasible=int(rows.size), runner_up=runner_up, context=context)

    def unschedulable(self, snapshot: Snapshot, request: ReplicaRequest,
                      masks: Sequence[np.ndarray | None]) -> Unschedulable:
        groups, details = self.rejections(snapshot, request, masks)
        return unschedulable(request.replica_id, "no node", groups, LazyRejections(snapshot.names, details))

    def rejections(self, snapshot: Snapshot, request: ReplicaRequest, masks: Sequence[np.ndarray | None],
                   remaining: np.ndarray | None = None, prefix: str = "",
                   ) -> tuple[list[tuple[str, int]], list[tuple[np.ndarray, Sequence[str], str]]]:
        """Charge each node to the first filter that rejected it: ``([(reason, nodes)]`` in
        pipeline order, ``[(rows, reasons, prefix)]``). Only rows still True in ``remaining``
        are charged; it is narrowed in place."""
        groups: list[tuple[str, int]] = []
        details: list[tuple[np.ndarray, Sequence[str], str]] = []
        if remaining is None:
            remaining = np.ones(len(snapshot), np.bool_)
        for plugin, mask in zip(self.filters, masks, strict=True):
            if mask is None:
                continue
            rejected = remaining & ~mask
            if rejected.any():
                rows = np.flatnonzero(rejected)
                groups += plugin.summarize(snapshot, request, rows)
                details.append((rows, plugin.reasons(snapshot, request, rows), prefix))
                remaining &= mask
        return groups, details


def unschedulable(replica_id: str, subject: str, groups: list[tuple[str, int]],
                  rejected: Mapping[str, str]) -> Unschedulable:
    """``subject: 3 nodes lack ...; 1 node cordoned``: equal reasons merged, largest group first."""
    merged: dict[str, int] = {}
    for reason, n in groups:
        merged[reason] = merged.get(reason, 0) + n
    counts = tuple(sorted(merged.items(), key=lambda item: -item[1]))   # stable: ties keep pipeline order
    summary = "; ".join(count_nodes(n, reason) for reason, n in counts) or "the cluster has no nodes"
    return Unschedulable(replica_id, f"{subject}: {summary}", counts, rejected)


def all_of(masks: Sequence[np.ndarray | None], n: int) -> np.ndarray:
    """Rows every mask passes (``None`` passes all)."""
    feasible = None
    for mask in masks:
        if mask is not None:
            feasible = mask if feasible is None else feasible & mask   # never in place: masks may be shared
    return feasible if feasible is not None else np.ones(n, np.bool_)


class LazyReasons(Sequence[str]):
    """``reason(i)`` for i in range(n), formatted when read. ``reason`` must close over
    numbers copied at decision time, never over live snapshot arrays."""

    def __init__(self, n: int, reason: Callable[[int], str]) -> None:
        self._n, self._reason = n, reason

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self._reason(j) for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._reason(i % self._n)

    def __len__(self) -> int:
        return self._n


class LazyRejections(Mapping[str, str]):
    """node -> why it was rejected, in node order, assembled on first read.

    Holds the snapshot's ``names`` list (replaced, never mutated, when nodes
    come and go) and each filter's rejected rows with their reasons."""

    def __init__(self, names: Sequence[str], details: Sequence[tuple[np.ndarray, Sequence[str], str]]) -> None:
        self._names, self._details = names, details
        self._cache: dict[str, str] | None = None

    def _reasons(self) -> dict[str, str]:
        if self._cache is None:
            found = []
            for rows, reasons, prefix in self._details:
                found += [(row, prefix + reasons[i]) for i, row in enumerate(rows.tolist())]
            self._cache = {self._names[row]: why for row, why in sorted(found)}
        return self._cache

    def __getitem__(self, node: str) -> str:
        return self._reasons()[node]

    def __iter__(self) -> Iterator[str]:
        return iter(self._reasons())

    def __len__(self) -> int:
        return len(self._reasons())
