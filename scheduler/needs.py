"""What one replica asks of a node, read from the typed spec (``scheduler/spec.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .spec import Placement, Resources


@dataclass(frozen=True)
class Needs:
    """One replica's request: GPUs and memory on each, CPU cores, host memory, where it may go.

    ``Needs()`` asks for nothing (a replica whose deployment is gone, a pipeline leader
    not placed yet)."""

    gpus: int = 0
    gpu_memory: int = 0     # bytes, on each GPU
    cpu: float = 0.0        # cores
    memory: int = 0         # bytes of host memory
    node_selector: Mapping[str, str] = field(default_factory=dict)
    strategy: str = "spread"

    @classmethod
    def of(cls, resources: Resources, placement: Placement) -> Needs:
        return cls(gpus=resources.gpus, gpu_memory=resources.gpu_memory, cpu=resources.cpu,
                   memory=resources.memory, node_selector=dict(placement.node_selector),
                   strategy=placement.strategy)
