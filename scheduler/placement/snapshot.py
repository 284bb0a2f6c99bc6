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
  change to a row.

The snapshot is a pure data structure: the scheduler builds it from node
reports (``from_nodes``) and keeps it fresh (``update_node``), and placement
mutates it only through ``reserve``.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable

import numpy as np

from .model import GpuView, NodeView, ReplicaRequest

# Available memory of a GPU slot a node does not have: below any request, and
# small enough in magnitude (1 PiB) that sums over a row cannot overflow int64.
PAD = -(1 << 50)

_GPU_COLUMNS = (("gpu_index", -1), ("gpu_total", 0), ("gpu_free", 0), ("gpu_reserved", 0),
                ("gpu_avail", PAD))
_NODE_COLUMNS = (("gpu_count", 0, np.int64), ("gpu_cap", 0, np.int64), ("gpu_total_sum", 0, np.int64),
                 ("gpu_avail_sum", 0, np.int64), ("cpu_free", 0.0, np.float64),
                 ("memory_free", 0, np.int64), ("ready", False, np.bool_),
                 ("cordoned", False, np.bool_), ("schedulable", False, np.bool_))


class Snapshot:
    """Every node's free GPU memory, CPU, memory, state, labels and replica counts."""

    def __init__(self, width: int = 0):
        self.names: list[str] = []           # row -> node name; replaced, never mutated
        self._rows: dict[str, int] = {}
        for column, pad in _GPU_COLUMNS:
            setattr(self, column, np.full((0, width), pad, np.int64))
        for column, pad, dtype in _NODE_COLUMNS:
            setattr(self, column, np.full(0, pad, dtype))
        self.avail_rank = np.full((width, 0), PAD, np.int64)
        self.gpu_uuid: list[list[str]] = []
        self.labels: list[dict[str, str]] = []
        self.replicas: list[Counter] = []
        self._counts: dict[str, np.ndarray] = {}
        self._label_masks: dict[tuple[str, str], np.ndarray] = {}

    # -- building and refreshing ------------------------------------------------------------

    @classmethod
    def from_nodes(cls, nodes: Iterable[NodeView]) -> Snapshot:
        """A snapshot of these nodes; raises ValueError on a duplicate name."""
        views = sorted(nodes, key=lambda view: view.name)
        width = max((len(view.gpus) for view in views), default=0)
        snapshot = cls(width)
        snapshot.names = [view.name for view in views]
        snapshot._rows = {name: row for row, name in enumerate(snapshot.names)}
        if len(snapshot._rows) != len(views):
            duplicates = sorted(name for name, n in Counter(snapshot.names).items() if n > 1)
            raise ValueError(f"duplicate node names: {', '.join(duplicates)}")
        n = len(views)
        for column, pad in _GPU_COLUMNS:
            setattr(snapshot, column, np.full((n, width), pad, np.int64))
        for column, pad, dtype in _NODE_COLUMNS:
            setattr(snapshot, column, np.full(n, pad, dtype))
        for row, view in enumerate(views):
            snapshot._write_row(row, view, refresh=False)
        snapshot._rank_all()
        return snapshot

    def update_node(self, view: NodeView) -> None:
        """Replace a node's row with its latest report (adding the node if it is new).

        The view replaces everything, reservations included: its ``GpuView.reserved``
        must carry what the scheduler has promised to replicas still loading there."""
        if len(view.gpus) > self.width:
            self._widen(len(view.gpus))
        row = self._rows.get(view.name)
        if row is None:
            row = bisect.bisect_left(self.names, view.name)
            self._insert_row(row, view.name)
        self._write_row(row, view)

    def remove_node(self, name: str) -> None:
        """Forget a node (deleted, not merely lost: a lost node stays, not ready)."""
        row = self.row(name)
        for column, _ in _GPU_COLUMNS:
            setattr(self, column, np.delete(getattr(self, column), row, axis=0))
        for column, _, _ in _NODE_COLUMNS:
            setattr(self, column, np.delete(getattr(self, column), row))
        self.names = self.names[:row] + self.names[row + 1:]      # replaced, never mutated: results hold it
        for lst in (self.gpu_uuid, self.labels, self.replicas):
            del lst[row]
        self._counts = {dep: np.delete(counts, row) for dep, counts in self._counts.items()}
        self._rows = {name: i for i, name in enumerate(self.names)}
        self._label_masks.clear()
        self._rank_all()

    def set_node_state(self, name: str, *, ready: bool | None = None, cordoned: bool | None = None) -> None:
        """Mark a node lost (``ready=False``) or cordoned without a full report."""
        row = self.row(name)
        if ready is not None:
            self.ready[row] = ready
        if cordoned is not None:
            self.cordoned[row] = cordoned
        self.schedulable[row] = self.ready[row] and not self.cordoned[row]

    def _write_row(self, row: int, view: NodeView, refresh: bool = True) -> None:
        gpus = sorted(view.gpus, key=lambda gpu: gpu.index)
        pad = self.width - len(gpus)
        total = [gpu.memory_total for gpu in gpus]
        free = [gpu.memory_free for gpu in gpus]
        reserved = [gpu.reserved for gpu in gpus]
        self.gpu_index[row] = [gpu.index for gpu in gpus] + [-1] * pad
        self.gpu_total[row] = total + [0] * pad
        self.gpu_free[row] = free + [0] * pad
        self.gpu_reserved[row] = reserved + [0] * pad
        self.gpu_avail[row] = [f - r for f, r in zip(free, reserved)] + [PAD] * pad
        self.gpu_count[row] = len(gpus)
        self.gpu_cap[row] = max(total, default=0)
        self.gpu_total_sum[row] = sum(total)
        self.cpu_free[row] = view.cpu_free
        self.memory_free[row] = view.memory_free
        self.ready[row] = view.ready
        self.cordoned[row] = view.cordoned
        self.schedulable[row] = view.ready and not view.cordoned
        uuids = [gpu.uuid for gpu in gpus]
        labels = dict(view.labels)
        if refresh:
            if labels != self.labels[row]:
                for (key, value), mask in self._label_masks.items():
                    mask[row] = labels.get(key) == value
            self._set_replicas(row, Counter(view.replicas))
            self.gpu_uuid[row], self.labels[row] = uuids, labels
            self._refresh_gpus(row)
        else:  # bulk build: lists are appended in row order, counts filled here
            self.gpu_uuid.append(uuids)
            self.labels.append(labels)
            self.replicas.append(Counter())
            self._set_replicas(row, Counter(view.replicas))

    def _set_replicas(self, row: int, replicas: Counter) -> None:
        old = self.replicas[row]
        for deployment in old.keys() - replicas.keys():
            self._counts[deployment][row] = 0
        for deployment, n in replicas.items():
            self._counts_of(deployment)[row] = n
        self.replicas[row] = replicas

    def _refresh_gpus(self, row: int) -> None:
        avail = self.gpu_avail[row].tolist()           # a handful of numbers: plain Python is quicker
        self.avail_rank[:, row] = sorted(avail, reverse=True)
        self.gpu_avail_sum[row] = sum(a for a in avail if a > 0)

    def _rank_all(self) -> None:
        self.avail_rank = np.ascontiguousarray(-np.sort(-self.gpu_avail, axis=1).T)
        self.gpu_avail_sum = np.maximum(self.gpu_avail, 0).sum(axis=1)

    def _insert_row(self, row: int, name: str) -> None:
        for column, pad in _GPU_COLUMNS:
            array = getattr(self, column)
            setattr(self, column, np.insert(array, row, np.full(array.shape[1], pad), axis=0))
        for column, pad, _ in _NODE_COLUMNS:
            setattr(self, column, np.insert(getattr(self, column), row, pad))
        self.names = self.names[:row] + [name] + self.names[row:]   # replaced, never mutated
        self.gpu_uuid.insert(row, [])
        self.labels.insert(row, {})
        self.replicas.insert(row, Counter())
        self._counts = {dep: np.insert(counts, row, 0) for dep, counts in self._counts.items()}
        self._rows = {node: i for i, node in enumerate(self.names)}
        self._label_masks.clear()
        self._rank_all()

    def _widen(self, width: int) -> None:
        extra = width - self.width
        for column, pad in _GPU_COLUMNS:
            setattr(self, column, np.pad(getattr(self, column), ((0, 0), (0, extra)), constant_values=pad))
        self._rank_all()

    # -- placing ------------------------------------------------------------------------------

    def reserve(self, row: int, slots: tuple[int, ...], request: ReplicaRequest) -> None:
        """Book a placed replica: its GPU memory on ``slots``, its CPU and memory, its count."""
        if slots:
            need = request.gpu_memory
            for slot in slots:
                self.gpu_reserved[row, slot] += need
                self.gpu_avail[row, slot] -= need
            self._refresh_gpus(row)
        self.cpu_free[row] -= request.cpu
        self.memory_free[row] -= request.memory
        self.replicas[row][request.deployment] += 1
        self._counts_of(request.deployment)[row] += 1

    # -- reading --------------------------------------------------------------------------------

    @property
    def width(self) -> int:
        """GPU slots per row: the most GPUs any node has."""
        return self.gpu_avail.shape[1]

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._rows

    def row(self, name: str) -> int:
        try:
            return self._rows[name]
        except KeyError:
            raise KeyError(f"no node named {name!r} in the snapshot") from None

    def replica_counts(self, deployment: str) -> np.ndarray:
        """Replicas of ``deployment`` per row (read only)."""
        counts = self._counts.get(deployment)
        return counts if counts is not None else np.zeros(len(self.names), np.int64)

    def label_mask(self, key: str, value: str) -> np.ndarray:
        """Rows whose label ``key`` equals ``value`` (cached, kept fresh by ``update_node``)."""
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
        other = Snapshot.__new__(Snapshot)
        for column, _ in _GPU_COLUMNS:
            setattr(other, column, getattr(self, column).copy())
        for column, _, _ in _NODE_COLUMNS:
            setattr(other, column, getattr(self, column).copy())
        other.avail_rank = self.avail_rank.copy()
        other.names = self.names                  # replaced, never mutated
        other._rows = dict(self._rows)
        other.gpu_uuid = list(self.gpu_uuid)      # rows are replaced, never mutated
        other.labels = list(self.labels)
        other._label_masks = {key: mask.copy() for key, mask in self._label_masks.items()}
        other.replicas = [Counter(counter) for counter in self.replicas]
        other._counts = {dep: counts.copy() for dep, counts in self._counts.items()}
        return other

    def _counts_of(self, deployment: str) -> np.ndarray:
        counts = self._counts.get(deployment)
        if counts is None:
            counts = self._counts[deployment] = np.zeros(len(self.names), np.int64)
        return counts
