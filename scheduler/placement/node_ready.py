"""Filter: only nodes that report (not lost) and take new work (not cordoned)."""

from __future__ import annotations

import numpy as np

from .framework import Filter

NOT_READY = "not ready (lost, or not reporting yet)"
CORDONED = "cordoned"


class NodeReady(Filter):
    name = "node_ready"

    def check(self, snapshot, request, row):
        if not snapshot.ready[row]:
            return NOT_READY
        return CORDONED if snapshot.cordoned[row] else None

    def mask(self, snapshot, request):
        return snapshot.schedulable

    def summarize(self, snapshot, request, rows: np.ndarray):
        lost = int(np.count_nonzero(~snapshot.ready[rows]))
        groups = [("not ready", lost), ("cordoned", rows.size - lost)]
        return [(reason, n) for reason, n in groups if n]

    def reasons(self, snapshot, request, rows):
        return [CORDONED if ready else NOT_READY for ready in snapshot.ready[rows].tolist()]
