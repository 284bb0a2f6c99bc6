"""What placement reads and returns: plain dataclasses, bytes as ints, no I/O.

GPU memory is the currency. A GPU's *available* memory is what NVML reported
free less what is ``reserved`` for replicas placed on it that are still
loading (their memory is promised but not yet visible to NVML); every filter
and score reads available memory, never raw free memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

GiB = 1 << 30
MiB = 1 << 20
STRATEGIES = ("spread", "pack")


def format_bytes(n: int) -> str:
    """``40 GiB``, ``1.5 GiB``, ``512 MiB``, ``100 B``: what a person reads in a reason."""
    size = abs(n)
    if size >= GiB:
        text, unit = f"{n / GiB:.1f}", "GiB"
    elif size >= MiB:
        text, unit = f"{n / MiB:.1f}", "MiB"
    else:
        return f"{n} B"
    return f"{text.removesuffix('.0')} {unit}"


@dataclass
class GpuView:
    index: int                 # NVML index: what CUDA_VISIBLE_DEVICES names
    uuid: str
    memory_total: int
    memory_free: int           # as NVML reported it
    reserved: int = 0          # promised to replicas still loading, not yet seen by NVML

    @property
    def available(self) -> int:
        return self.memory_free - self.reserved


@dataclass
class NodeView:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    gpus: list[GpuView] = field(default_factory=list)
    cpu_free: float = 0.0
    memory_free: int = 0
    cordoned: bool = False
    ready: bool = True         # False: lost (missed heartbeats) or not yet ready
    replicas: Counter[str] = field(default_factory=Counter)   # deployment -> replicas on this node


@dataclass(frozen=True)
class ReplicaRequest:
    replica_id: str
    deployment: str
    gpus: int = 0              # 0: CPU only
    gpu_memory: int = 0        # bytes needed on EACH of its GPUs
    cpu: float = 0.0
    memory: int = 0            # host memory, bytes
    node_selector: Mapping[str, str] = field(default_factory=dict)
    strategy: str = "spread"   # "spread" | "pack"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"replica {self.replica_id}: strategy {self.strategy!r} is not one of {STRATEGIES}")
        if self.gpus < 0 or self.gpu_memory < 0 or self.cpu < 0 or self.memory < 0:
            raise ValueError(f"replica {self.replica_id}: resource requests must not be negative")


@dataclass(frozen=True)
class Decision:
    """Why a replica is where it is: each score plugin's 0..1 score for the chosen node."""

    replica_id: str
    node: str
    gpu_indices: tuple[int, ...]
    strategy: str
    scores: Mapping[str, float]          # plugin -> score of the chosen node, 0..1
    weights: Mapping[str, float]         # plugin -> weight in this strategy's profile
    total: float                         # weighted mean of the scores
    notes: Mapping[str, str]             # plugin -> what its score stands for on this node
    feasible: int                        # nodes that passed every filter, the chosen one included
    runner_up: tuple[str, float] | None = None   # next best node and its total
    context: str = ""                    # e.g. the gang it was placed with

    def explain(self) -> str:
        parts = []
        for name, score in self.scores.items():
            note = self.notes.get(name)
            parts.append(f"{name} {round(score, 2)}" + (f" ({note})" if note else ""))
        others = self.feasible - 1
        if others == 0:
            tail = "the only feasible node"
        else:
            tail = f"chosen over {others} other feasible node{'s' if others != 1 else ''}"
            if self.runner_up is not None:
                tail += f" (next best {self.runner_up[0]}: {round(self.runner_up[1], 2)})"
        return f"{self.node}: {', '.join(parts)}; {tail}" + (f"; {self.context}" if self.context else "")


@dataclass(frozen=True)
class Placement:
    replica_id: str
    node: str
    gpu_indices: tuple[int, ...]
    decision: Decision | None = field(default=None, compare=False, repr=False)

    def explain(self) -> str:
        return self.decision.explain() if self.decision else f"{self.node}: placed"


@dataclass(frozen=True)
class Unschedulable:
    """"Does not fit" as data: a one-line summary, counts per reason, and why each node said no.

    ``reasons`` reads like ``no node: 3 nodes lack 40 GiB free on one GPU; 1
    node cordoned``: each node counts once, under the first filter that
    rejected it, largest group first. ``rejected`` maps every node to its
    reason; it is worked out on first read from a copy of the snapshot taken
    when the decision was made.
    """

    replica_id: str
    reasons: str
    counts: tuple[tuple[str, int], ...] = ()       # (reason, nodes), as summarised in ``reasons``
    rejected: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def explain(self) -> str:
        lines = [f"{self.replica_id}: {self.reasons}"]
        lines += [f"  {node}: {why}" for node, why in self.rejected.items()]
        return "\n".join(lines)
