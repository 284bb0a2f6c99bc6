"""GPU memory, the currency: filter, score, and the choice of GPUs.

A replica asking for ``gpus=k, gpu_memory=m`` needs ``k`` distinct GPUs on
one node, each with ``m`` bytes *available* (NVML free less reserved).

Which GPUs: with ``pack``, best fit: the ``k`` GPUs with the least available
memory that still suffices, keeping roomy GPUs whole for big replicas; with
``spread``, the ``k`` GPUs with the most available memory. Ties go to the
lower GPU index. The score rates that same choice: with ``spread``, the
fraction of the chosen GPUs left available after placing (headroom); with
``pack``, one minus it (tightness).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .framework import Filter, LazyReasons, Scorer
from .model import ReplicaRequest, format_bytes
from .snapshot import Snapshot


def _unit(score: np.ndarray) -> np.ndarray:
    """Clamp to 0..1 in place (a report with free > total must not score above 1)."""
    np.minimum(np.maximum(score, 0.0, out=score), 1.0, out=score)
    return score


def _best_gpu_columns(snapshot: Snapshot) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What a rejection names about a node's most available GPU."""
    return snapshot.gpu_avail, snapshot.gpu_index, snapshot.gpu_free, snapshot.gpu_reserved


def _why(request: ReplicaRequest, count: int, enough: int, avail: int, index: int, free: int, reserved: int) -> str:
    k, need = request.gpus, format_bytes(request.gpu_memory)
    if count < k:
        return f"has {count} GPU{'' if count == 1 else 's'}, needs {k}"
    most = f"{format_bytes(avail)} on GPU {index}"
    if reserved:
        most += f" ({format_bytes(free)} free less {format_bytes(reserved)} reserved)"
    if k == 1:
        return f"needs {need} available on one GPU; the most available is {most}"
    return (f"needs {need} available on each of {k} GPUs; {enough} {'has' if enough == 1 else 'have'} it "
            f"(the most available is {most})")


class GpuMemory(Filter, Scorer):
    name = "gpu_memory"

    # -- filter -----------------------------------------------------------------------

    def mask(self, snapshot: Snapshot, request: ReplicaRequest) -> np.ndarray | None:
        k = request.gpus
        if k == 0:
            return None
        if k > snapshot.width:
            return np.zeros(len(snapshot), np.bool_)
        # the k-th largest available memory of each node decides
        fits: np.ndarray = snapshot.avail_rank[k - 1] >= request.gpu_memory
        return fits

    def check(self, snapshot: Snapshot, request: ReplicaRequest, row: int) -> str | None:
        if request.gpus == 0:
            return None
        count = int(snapshot.gpu_count[row])
        if count < request.gpus:
            return _why(request, count, 0, 0, 0, 0, 0)
        avail = snapshot.gpu_avail[row, :count].tolist()
        enough = sum(1 for a in avail if a >= request.gpu_memory)
        if enough >= request.gpus:
            return None
        best = max(range(count), key=lambda slot: (avail[slot], -slot))
        return _why(request, count, enough, *(int(column[row, best]) for column in _best_gpu_columns(snapshot)))

    def reasons(self, snapshot: Snapshot, request: ReplicaRequest, rows: np.ndarray) -> Sequence[str]:
        if snapshot.width == 0:                             # no node has a GPU
            return [_why(request, 0, 0, 0, 0, 0, 0)] * rows.size
        count = snapshot.gpu_count[rows]
        avail = snapshot.gpu_avail[rows]
        enough = np.count_nonzero(avail >= request.gpu_memory, axis=1)
        best = np.argmax(avail, axis=1)                     # the first most available slot
        best_columns = [column[rows, best] for column in _best_gpu_columns(snapshot)]   # copies
        return LazyReasons(rows.size, lambda i: _why(request, int(count[i]), int(enough[i]),
                                                     *(int(column[i]) for column in best_columns)))

    def summarize(self, snapshot: Snapshot, request: ReplicaRequest, rows: np.ndarray) -> list[tuple[str, int]]:
        need = format_bytes(request.gpu_memory)
        where = "one GPU" if request.gpus == 1 else f"each of {request.gpus} GPUs"
        return [(f"lack {need} free on {where}", rows.size)]

    # -- score --------------------------------------------------------------------------

    def score(self, snapshot: Snapshot, request: ReplicaRequest, rows: np.ndarray) -> np.ndarray | None:
        k, need = request.gpus, request.gpu_memory
        if k == 0:
            return None
        cap = snapshot.gpu_cap[rows]                        # a copy: made the divisor in place
        np.maximum(cap, 1, out=cap)
        if k > 1:
            cap *= k
        rank = snapshot.avail_rank
        if request.strategy == "spread":      # the k largest
            chosen = rank[0, rows] if k == 1 else rank[:k, rows].sum(axis=0)
            return _unit((chosen - k * need) / cap)
        # pack: the k least sufficient, ranks enough-k .. enough-1 (enough >= k on feasible rows);
        # a sum of booleans along the axis is quicker than count_nonzero's
        enough = (rank >= need).sum(axis=0)[rows]
        if k == 1:
            chosen = rank[enough - 1, rows]
        else:
            prefix = np.zeros((rank.shape[0] + 1, rows.size), np.int64)
            np.cumsum(np.maximum(rank[:, rows], 0), axis=0, out=prefix[1:])
            line = np.arange(rows.size)
            chosen = prefix[enough, line] - prefix[enough - k, line]
        score = (chosen - k * need) / cap
        return _unit(np.subtract(1.0, score, out=score))

    def note(self, snapshot: Snapshot, request: ReplicaRequest, row: int, slots: tuple[int, ...]) -> str | None:
        if not slots:
            return None
        index, avail = snapshot.gpu_index[row].tolist(), snapshot.gpu_avail[row].tolist()
        return ", ".join(f"GPU {index[slot]}: {format_bytes(avail[slot] - request.gpu_memory)} left"
                         for slot in slots)

    # -- choice ------------------------------------------------------------------------

    def assign(self, snapshot: Snapshot, request: ReplicaRequest, row: int) -> tuple[int, ...]:
        """The GPU slots (columns) of ``row`` the replica gets; the node must pass the filter."""
        k, need = request.gpus, request.gpu_memory
        if k == 0:
            return ()
        avail = snapshot.gpu_avail[row, :int(snapshot.gpu_count[row])].tolist()
        fitting = [slot for slot, a in enumerate(avail) if a >= need]
        if request.strategy == "pack":
            fitting.sort(key=lambda slot: avail[slot])        # stable: lower index first on ties
        else:
            fitting.sort(key=lambda slot: -avail[slot])
        if len(fitting) < k:
            raise ValueError(f"replica {request.replica_id} does not fit on {snapshot.names[row]}")
        return tuple(sorted(fitting[:k]))
