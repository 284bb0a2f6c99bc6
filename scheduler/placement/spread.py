"""Score: fewer replicas of the same deployment on a node is better.

Normalised over the feasible nodes: those with the fewest replicas of the
deployment score 1, those with the most 0 (all 1 when the counts are equal),
so under the spread profile a deployment fills every host once before any
host twice: 6 replicas on 3 equal nodes land 2, 2, 2.
"""

from __future__ import annotations

import numpy as np

from .framework import Scorer
from .model import ReplicaRequest
from .snapshot import Snapshot


class Spread(Scorer):
    name = "spread"

    def score(self, snapshot: Snapshot, request: ReplicaRequest, rows: np.ndarray) -> np.ndarray | None:
        counts = snapshot.replica_counts(request.deployment)[rows]
        low, high = counts.min(), counts.max()
        if high == low:
            return np.ones(rows.size)
        score: np.ndarray = (high - counts) / (high - low)
        return score

    def note(self, snapshot: Snapshot, request: ReplicaRequest, row: int, slots: tuple[int, ...]) -> str | None:
        n = int(snapshot.replica_counts(request.deployment)[row])
        return f"{n} replica{'' if n == 1 else 's'} of this deployment there"
