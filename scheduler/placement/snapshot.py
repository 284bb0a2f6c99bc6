"""The cluster as placement sees it: one row per node, sorted by name, in numpy arrays.

Filters and scores read whole columns, so one request is judged against every
node in a handful of array operations. Rows are kept in name order, so the
first best row is also the best node with the smallest name: ties break
deterministically for free.

GPU columns (``gpu_*[row, slot]``, slots in NVML index order) are padded to
the widest node. A padded slot has no memory (``gpu_total`` 0) and an
available memory of ``PAD``, far below any request, so it never fits.
``avail_rank[j, row]`` is the ``j``-th largest available memory of a node
(stored rank-major, so one rank across all nodes is one contiguous vector):
a node has ``k`` GPUs with ``m`` bytes available each exactly when
``avail_rank[k - 1, row] >= m``.

Invariants the placement relies on:

- ``gpu_avail == gpu_free - gpu_reserved`` on real slots; ``reserve``
  (placing a replica) raises ``gpu_reserved``, so a batch of placements never
  promises the same bytes twice;
- ``avail_rank``, ``gpu_avail_sum`` and the replica counts follow every
  ``reserve``.

The snapshot is built whole from node views (``from_nodes``), once per
placement pass, and thrown away after it: the scheduler derives each node's
view from the latest report and the replicas it has placed there
(scheduler/placing.py). It has no incremental update on purpose: in ``bench.placement`` (1,000
nodes x 8 GPUs) taking every report one row at a time cost as much as a
rebuild (15.2 ms vs 14.5 ms, measured side by side), a rebuild now takes
about 8 ms, and a rebuild cannot drift from the reports.
Placement mutates it only through ``reserve``; ``copy`` gives an independent
one to ask "what if".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .model import GpuView, NodeView, ReplicaRequest

# Available memory of a GPU slot a node does not have: below any request, and
# small enough in magnitude (1 PiB) that sums over a row cannot overflow int64.
PAD = -(1 << 50)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(eq=False)
class Snapshot:
    """Every node's free GPU memory, CPU, memory, state, labels and replica counts.

    Every column is declared here; a row's values in all of them describe the
    node ``names[row]``."""

    names: list[str]                 # row -> node name, sorted; replaced, never mutated (results hold it)
    # GPU columns, [row, slot]; a padded slot holds the value after the comma.
    gpu_index: IntArray              # NVML index, -1
    gpu_total: IntArray              # bytes, 0
    gpu_free: IntArray               # bytes as last reported, 0
    gpu_reserved: IntArray           # bytes promised to replicas loading there or placed in this pass, 0
    gpu_avail: IntArray              # gpu_free - gpu_reserved, PAD
    avail_rank: IntArray             # [rank, row]: each row's gpu_avail sorted high to low
    # Node columns, [row].
    gpu_count: IntArray              # real GPU slots
    gpu_cap: IntArray                # the largest GPU's total bytes
    gpu_total_sum: IntArray
    gpu_avail_sum: IntArray          # sum of the positive gpu_avail
    cpu_free: FloatArray             # cores
    memory_free: IntArray            # bytes of host memory
    ready: BoolArray                 # reporting and not lost
    cordoned: BoolArray              # cordoned or draining
    schedulable: BoolArray           # ready and not cordoned
    # Per row Python values.
    gpu_uuid: list[list[str]]        # rows replaced, never mutated
    labels: list[dict[str, str]]     # rows replaced, never mutated
    replicas: list[Counter[str]]     # deployment -> replicas on the node (``reserve`` adds to it)
    _rows: dict[str, int] = field(repr=False)
    _counts: dict[str, IntArray] = field(repr=False)         # deployment -> replicas per row
    _label_masks: dict[tuple[str, str], BoolArray] = field(default_factory=dict, repr=False)

    # -- building ---------------------------------------------------------------------------------

    @classmethod
    def from_nodes(cls, nodes: Iterable[NodeView]) -> Snapshot:
        """A snapshot of these nodes; raises ValueError on a duplicate name."""
        views = sorted(nodes, key=lambda view: view.name)
        names = [view.name for view in views]
        rows = {name: row for row, name in enumerate(names)}
        if len(rows) != len(views):
            duplicates = sorted(name for name, n in Counter(names).items() if n > 1)
            raise ValueError(f"duplicate node names: {', '.join(duplicates)}")
        gpus = [sorted(view.gpus, key=lambda gpu: gpu.index) for view in views]
        width = max((len(row) for row in gpus), default=0)
        n = len(views)

        def padded(value: str, pad: int) -> IntArray:
            """One GPU column, built from plain lists in one go (quicker than row by row)."""
            return np.array([[getattr(gpu, value) for gpu in row] + [pad] * (width - len(row)) for row in gpus],
                            np.int64).reshape(n, width)

        gpu_total, gpu_free = padded("memory_total", 0), padded("memory_free", 0)
        gpu_reserved = padded("reserved", 0)
        gpu_avail = np.where(padded("index", -1) >= 0, gpu_free - gpu_reserved, PAD)
        ready = np.array([view.ready for view in views], np.bool_)
        cordoned = np.array([view.cordoned for view in views], np.bool_)
        replicas = [Counter(view.replicas) for view in views]
        counts: dict[str, IntArray] = {}
        for row, counter in enumerate(replicas):
            for deployment, count in counter.items():
                counts.setdefault(deployment, np.zeros(n, np.int64))[row] = count
        return cls(
            names=names, gpu_index=padded("index", -1), gpu_total=gpu_total, gpu_free=gpu_free,
            gpu_reserved=gpu_reserved, gpu_avail=gpu_avail, avail_rank=_rank(gpu_avail),
            gpu_count=np.array([len(row) for row in gpus], np.int64).reshape(n),
            gpu_cap=gpu_total.max(axis=1, initial=0), gpu_total_sum=gpu_total.sum(axis=1),
            gpu_avail_sum=np.maximum(gpu_avail, 0).sum(axis=1),
            cpu_free=np.array([view.cpu_free for view in views], np.float64).reshape(n),
            memory_free=np.array([view.memory_free for view in views], np.int64).reshape(n),
            ready=ready.reshape(n), cordoned=cordoned.reshape(n), schedulable=(ready & ~cordoned).reshape(n),
            gpu_uuid=[[gpu.uuid for gpu in row] for row in gpus], labels=[dict(view.labels) for view in views],
            replicas=replicas, _rows=rows, _counts=counts)

    # -- placing ------------------------------------------------------------------------------

    def reserve(self, row: int, slots: tuple[int, ...], request: ReplicaRequest) -> None:
        """Book a placed replica: its GPU memory on ``slots``, its CPU and memory, its count."""
        if slots:
            need = request.gpu_memory
            for slot in slots:
                self.gpu_reserved[row, slot] += need
                self.gpu_avail[row, slot] -= need
            avail = self.gpu_avail[row].tolist()           # a handful of numbers: plain Python is quicker
            self.avail_rank[:, row] = sorted(avail, reverse=True)
            self.gpu_avail_sum[row] = sum(a for a in avail if a > 0)
        self.cpu_free[row] -= request.cpu
        self.memory_free[row] -= request.memory
        self.replicas[row][request.deployment] += 1
        counts = self._counts.get(request.deployment)
        if counts is None:
            counts = self._counts[request.deployment] = np.zeros(len(self.names), np.int64)
        counts[row] += 1

    # -- reading --------------------------------------------------------------------------------

    @property
    def width(self) -> int:
        """GPU slots per row: the most GPUs any node has."""
        return int(self.gpu_avail.shape[1])

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._rows

    def row(self, name: str) -> int:
        try:
            return self._rows[name]
        except KeyError:
            raise KeyError(f"no node named {name!r} in the snapshot") from None

    def replica_counts(self, deployment: str) -> IntArray:
        """Replicas of ``deployment`` per row (read only)."""
        counts = self._counts.get(deployment)
        return counts if counts is not None else np.zeros(len(self.names), np.int64)

    def label_mask(self, key: str, value: str) -> BoolArray:
        """Rows whose label ``key`` equals ``value`` (cached: labels do not change in a snapshot)."""
        mask = self._label_masks.get((key, value))
        if mask is None:
            mask = np.fromiter((labels.get(key) == value for labels in self.labels), np.bool_,
                               count=len(self.labels))
            self._label_masks[(key, value)] = mask
        return mask

    def node(self, name: str) -> NodeView:
        """The node as it stands now, reservations of placed replicas included."""
        row = self.row(name)
        gpus = [GpuView(index=int(self.gpu_index[row, slot]), uuid=self.gpu_uuid[row][slot],
                        memory_total=int(self.gpu_total[row, slot]),
                        memory_free=int(self.gpu_free[row, slot]),
                        reserved=int(self.gpu_reserved[row, slot]))
                for slot in range(int(self.gpu_count[row]))]
        return NodeView(name=name, labels=dict(self.labels[row]), gpus=gpus,
                        cpu_free=float(self.cpu_free[row]), memory_free=int(self.memory_free[row]),
                        cordoned=bool(self.cordoned[row]), ready=bool(self.ready[row]),
                        replicas=Counter(self.replicas[row]))

    def nodes(self) -> list[NodeView]:
        return [self.node(name) for name in self.names]

    def copy(self) -> Snapshot:
        """An independent copy: place on it to ask "what if" without touching this one."""
        return Snapshot(
            names=self.names, gpu_index=self.gpu_index.copy(), gpu_total=self.gpu_total.copy(),
            gpu_free=self.gpu_free.copy(), gpu_reserved=self.gpu_reserved.copy(),
            gpu_avail=self.gpu_avail.copy(), avail_rank=self.avail_rank.copy(),
            gpu_count=self.gpu_count.copy(), gpu_cap=self.gpu_cap.copy(),
            gpu_total_sum=self.gpu_total_sum.copy(), gpu_avail_sum=self.gpu_avail_sum.copy(),
            cpu_free=self.cpu_free.copy(), memory_free=self.memory_free.copy(), ready=self.ready.copy(),
            cordoned=self.cordoned.copy(), schedulable=self.schedulable.copy(),
            gpu_uuid=list(self.gpu_uuid), labels=list(self.labels),
            replicas=[Counter(counter) for counter in self.replicas], _rows=self._rows,
            _counts={dep: counts.copy() for dep, counts in self._counts.items()},
            _label_masks={key: mask.copy() for key, mask in self._label_masks.items()})


def _rank(gpu_avail: IntArray) -> IntArray:
    """``avail_rank``: each row's available memory sorted high to low, rank-major and contiguous."""
    return np.ascontiguousarray(-np.sort(-gpu_avail, axis=1).T)
