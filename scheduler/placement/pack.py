"""Score: prefer fuller nodes (the share of a node's GPU memory not available), for ``pack``.

Filling busy nodes first leaves whole nodes free for replicas that need many
GPUs, and idle nodes that can be drained. A node without GPUs scores 0.
"""

from __future__ import annotations

import numpy as np

from .framework import Scorer
from .model import ReplicaRequest
from .snapshot import Snapshot


class Pack(Scorer):
    name = "pack"

    def score(self, snapshot: Snapshot, request: ReplicaRequest, rows: np.ndarray) -> np.ndarray | None:
        total = snapshot.gpu_total_sum[rows]                # copies: worked on in place
        used = total - snapshot.gpu_avail_sum[rows]
        score: np.ndarray = used / np.maximum(total, 1, out=total)
        np.minimum(np.maximum(score, 0.0, out=score), 1.0, out=score)   # clamped in place
        return score

    def note(self, snapshot: Snapshot, request: ReplicaRequest, row: int, slots: tuple[int, ...]) -> str | None:
        total = int(snapshot.gpu_total_sum[row])
        if not total:
            return "no GPUs"
        used = total - int(snapshot.gpu_avail_sum[row])
        return f"{100 * used / total:.0f}% of its GPU memory in use"
