"""Score: fewer replicas of the same deployment on a node is better.

Normalised over the feasible nodes: those with the fewest replicas of the
deployment score 1, those with the most 0 (all 1 when the counts are equal),
so under the spread profile a deployment fills every host once before any
host twice: 6 replicas on 3 equal nodes land 2, 2, 2.
"""

from __future__ import annotations

import numpy as np

from .framework import Scorer


class Spread(Scorer):
    name = "spread"

    def score(self, snapshot, request, rows):
        counts = snapshot.replica_counts(request.deployment)[rows]
        low, high = counts.min(), counts.max()
        if high == low:
            return np.ones(rows.size)
        return (high - counts) / (high - low)

    def note(self, snapshot, request, row, slots):
        n = int(snapshot.replica_counts(request.deployment)[row])
        return f"{n} replica{'' if n == 1 else 's'} of this deployment there"
