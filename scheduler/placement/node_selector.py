"""Filter: a replica with a node selector goes only where every selected label matches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .framework import Filter, LazyReasons
from .model import ReplicaRequest
from .snapshot import Snapshot


def selector_text(selector: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(selector.items()))


def _why(selector: Mapping[str, str], labels: Mapping[str, str]) -> str | None:
    wrong = [f"{key}={labels[key]} (wants {value})" if key in labels else f"no label {key} (wants {value})"
             for key, value in sorted(selector.items()) if labels.get(key) != value]
    return f"does not match selector: {', '.join(wrong)}" if wrong else None


class NodeSelector(Filter):
    name = "node_selector"

    def check(self, snapshot: Snapshot, request: ReplicaRequest, row: int) -> str | None:
        return _why(request.node_selector, snapshot.labels[row])

    def mask(self, snapshot: Snapshot, request: ReplicaRequest) -> np.ndarray | None:
        mask = None
        for key, value in request.node_selector.items():
            labelled = snapshot.label_mask(key, value)
            mask = labelled if mask is None else mask & labelled
        return mask

    def summarize(self, snapshot: Snapshot, request: ReplicaRequest, rows: np.ndarray) -> list[tuple[str, int]]:
        return [(f"do not match selector {selector_text(request.node_selector)}", rows.size)]

    def reasons(self, snapshot: Snapshot, request: ReplicaRequest, rows: np.ndarray) -> Sequence[str]:
        labels = [snapshot.labels[row] for row in rows.tolist()]   # each node's dict is replaced, never mutated
        return LazyReasons(len(labels), lambda i: _why(request.node_selector, labels[i]) or "rejected")
