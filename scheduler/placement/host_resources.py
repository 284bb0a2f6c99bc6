"""Filter: enough free CPU and host memory for the replica process."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .framework import Filter, LazyReasons
from .model import ReplicaRequest, format_bytes
from .snapshot import Snapshot

# CPU is a float booked by subtraction; forgive rounding far below a millicore.
CPU_EPSILON = 1e-6


def cpus(n: float) -> str:
    return f"{n:g} CPU{'' if n == 1 else 's'}"


def _why(request: ReplicaRequest, cpu_free: float, memory_free: int) -> str | None:
    if cpu_free + CPU_EPSILON < request.cpu:
        return f"needs {cpus(request.cpu)}, has {cpu_free:g} free"
    if memory_free < request.memory:
        return f"needs {format_bytes(request.memory)} host memory, has {format_bytes(memory_free)} free"
    return None


class HostResources(Filter):
    name = "host_resources"

    def check(self, snapshot: Snapshot, request: ReplicaRequest, row: int) -> str | None:
        return _why(request, float(snapshot.cpu_free[row]), int(snapshot.memory_free[row]))

    def mask(self, snapshot: Snapshot, request: ReplicaRequest) -> np.ndarray | None:
        if request.cpu <= 0 and request.memory <= 0:
            return None
        cpu_fits: np.ndarray = snapshot.cpu_free + CPU_EPSILON >= request.cpu
        if request.memory <= 0:
            return cpu_fits
        fits: np.ndarray = cpu_fits & (snapshot.memory_free >= request.memory)
        return fits

    def summarize(self, snapshot: Snapshot, request: ReplicaRequest, rows: np.ndarray) -> list[tuple[str, int]]:
        short_of_cpu = int(np.count_nonzero(snapshot.cpu_free[rows] + CPU_EPSILON < request.cpu))
        groups = [(f"lack {cpus(request.cpu)} free", short_of_cpu),
                  (f"lack {format_bytes(request.memory)} host memory free", rows.size - short_of_cpu)]
        return [(reason, n) for reason, n in groups if n]

    def reasons(self, snapshot: Snapshot, request: ReplicaRequest, rows: np.ndarray) -> Sequence[str]:
        cpu_free, memory_free = snapshot.cpu_free[rows], snapshot.memory_free[rows]   # copies
        return LazyReasons(rows.size, lambda i: _why(request, float(cpu_free[i]), int(memory_free[i])) or "rejected")
