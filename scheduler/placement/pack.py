"""Score: prefer fuller nodes (the share of a node's GPU memory not available), for ``pack``.

Filling busy nodes first leaves whole nodes free for replicas that need many
GPUs, and idle nodes that can be drained. A node without GPUs scores 0.
"""

from __future__ import annotations

import numpy as np

from .framework import Scorer


class Pack(Scorer):
    name = "pack"

    def score(self, snapshot, request, rows):
        total = snapshot.gpu_total_sum[rows]
        used = total - snapshot.gpu_avail_sum[rows]
        score = used / np.maximum(total, 1)
        return np.minimum(np.maximum(score, 0.0, out=score), 1.0, out=score)

    def note(self, snapshot, request, row, slots):
        total = int(snapshot.gpu_total_sum[row])
        if not total:
            return "no GPUs"
        used = total - int(snapshot.gpu_avail_sum[row])
        return f"{100 * used / total:.0f}% of its GPU memory in use"
