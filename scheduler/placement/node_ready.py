"""Filter: only nodes that report (not lost) and take new work (not cordoned)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .framework import Filter
from .model import ReplicaRequest
from .snapshot import Snapshot

NOT_READY = "not ready (lost, or not reporting yet)"
CORDONED = "cordoned"


class NodeReady(Filter):
    name = "node_ready"

    def check(self, snapshot: Snapshot, request: ReplicaRequest, row: int) -> str | None:
        if not snapshot.ready[row]:
            return NOT_READY
        return CORDONED if snapshot.cordoned[row] else None

    def mask(self, snapshot: Snapshot, request: ReplicaRequest) -> np.ndarray | None:
        schedulable: np.ndarray = snapshot.schedulable
        return schedulable

    def summarize(self, snapshot: Snapshot, request: ReplicaRequest, rows: np.ndarray) -> list[tuple[str, int]]:
        lost = int(np.count_nonzero(~snapshot.ready[rows]))
        groups = [("not ready", lost), ("cordoned", rows.size - lost)]
        return [(reason, n) for reason, n in groups if n]

    def reasons(self, snapshot: Snapshot, request: ReplicaRequest, rows: np.ndarray) -> Sequence[str]:
        return [CORDONED if ready else NOT_READY for ready in snapshot.ready[rows].tolist()]
