"""The GPU seam: what this host's GPUs hold, from NVML, from a fake, or nothing.

Three sides, one interface (``GpuProbe``):

- ``NvmlProbe`` reads the real GPUs through nvidia-ml-py (``pynvml``). Every
  NVML call runs in a worker thread, never on the event loop.
- ``FakeProbe`` stands in for GPUs on a host without any, and only when asked
  for (``--fake-gpus 2x80GiB``). Its used memory is the memory the agent's
  running replicas declare (see ``GpuLoad``), so a scheduler sees free memory
  fall as replicas start and rise as they stop.
- ``NoGpuProbe`` is a CPU-only host: no GPUs, and a reason that says why.

``select_probe`` picks one. Guarantee: a fake is used only when a fake spec
is given; without one the result is NVML or ``NoGpuProbe`` — never a silent
fake. Every probe names its ``source`` ("nvml" | "fake" | "none"), which the
agent puts in its Register and in every report.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from meshserve.common.sizes import parse_size

log = logging.getLogger(__name__)

SOURCE_NVML = "nvml"
SOURCE_FAKE = "fake"
SOURCE_NONE = "none"

# "2x80GiB", "80GiB" (one GPU), "1 x 24 GiB"
_PART = re.compile(r"^\s*(?:(\d+)\s*[xX]\s*)?(.+?)\s*$")


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one moment. ``used + free == total`` (NVML's own accounting may differ by reserved memory)."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    utilization_percent: int = 0
    power_watts: float = 0.0   # NVML's power draw; 0 where unsupported, and on fake GPUs
    processes: tuple[GpuProcess, ...] = ()


@dataclass(frozen=True)
class GpuLoad:
    """What one running replica process holds: ``memory_bytes`` on EACH GPU of ``gpu_indices``.

    Only ``FakeProbe`` reads loads; real GPUs are measured, not declared.
    """

    pid: int
    gpu_indices: tuple[int, ...]
    memory_bytes: int


class GpuProbe(Protocol):
    source: str

    async def sample(self, loads: Sequence[GpuLoad] = ()) -> list[GpuSample]:
        """The GPUs now, in index order."""

    def close(self) -> None:
        """Release the backend (NVML handle); idempotent."""


@dataclass(frozen=True)
class FakeGpuSpec:
    memory_total_bytes: int
    name: str


def parse_fake_spec(spec: str) -> list[FakeGpuSpec]:
    """``"1x24GiB,2x80GiB"`` -> three GPUs (indices 0, 1, 2 in that order).

    Raises ``ValueError`` naming the part that does not parse.
    """
    gpus: list[FakeGpuSpec] = []
    parts = spec.split(",")
    for part in parts:
        match = _PART.match(part)
        if not part.strip() or not match:
            raise ValueError(f"--fake-gpus {spec!r}: empty part {part!r}; expected COUNTxSIZE like 2x80GiB")
        count = int(match.group(1)) if match.group(1) is not None else 1
        try:
            size = parse_size(match.group(2))
        except ValueError as err:
            raise ValueError(f"--fake-gpus {spec!r}: bad part {part.strip()!r}: {err}") from None
        if count < 1 or size < 1:
            raise ValueError(f"--fake-gpus {spec!r}: bad part {part.strip()!r}: count and size must be positive")
        gpus.extend(FakeGpuSpec(size, f"Fake GPU {match.group(2).strip()}") for _ in range(count))
    return gpus


class FakeProbe:
    """Fake GPUs whose used memory is the sum of the running replicas' declared loads.

    Guarantees: uuids are ``GPU-fake-…``, distinct per index and stable for one
    ``seed`` (the agent passes its node name, so a restarted agent reports the
    same GPUs). Used memory is capped at the total (a real GPU would refuse the
    allocation); loads on indices the host does not have are ignored, as CUDA
    would refuse them. Utilization is always 0: nothing computes.
    """

    source = SOURCE_FAKE

    def __init__(self, spec: str, *, seed: str = ""):
        self.spec = spec
        self.gpus = parse_fake_spec(spec)
        self.uuids = [f"GPU-fake-{uuid.uuid5(uuid.NAMESPACE_URL, f'meshserve-fake-gpu/{seed}/{index}')}"
                      for index in range(len(self.gpus))]

    def sample_now(self, loads: Sequence[GpuLoad] = ()) -> list[GpuSample]:
        samples = []
        for index, gpu in enumerate(self.gpus):
            processes = tuple(GpuProcess(load.pid, load.memory_bytes) for load in loads if index in load.gpu_indices)
            used = min(gpu.memory_total_bytes, sum(process.used_memory_bytes for process in processes))
            samples.append(GpuSample(
                index=index, uuid=self.uuids[index], name=gpu.name,
                memory_total_bytes=gpu.memory_total_bytes, memory_used_bytes=used,
                memory_free_bytes=gpu.memory_total_bytes - used, processes=processes,
            ))
        return samples

    async def sample(self, loads: Sequence[GpuLoad] = ()) -> list[GpuSample]:
        return self.sample_now(loads)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"FakeProbe({self.spec!r})"


@dataclass
class NoGpuProbe:
    """A CPU-only host: no GPUs; ``reason`` says why (no driver, no device)."""

    reason: str = "no GPU"
    source: str = field(default=SOURCE_NONE, init=False)

    async def sample(self, loads: Sequence[GpuLoad] = ()) -> list[GpuSample]:
        return []

    def close(self) -> None:
        pass


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class NvmlProbe:
    """Real GPUs through NVML. Build it with ``NvmlProbe.open()`` (blocking: it initializes NVML).

    ``sample`` runs in a worker thread. A GPU query NVML does not support on a
    device (utilization under MIG, processes on some drivers) reads as 0 / no
    processes rather than failing the whole sample.
    """

    source = SOURCE_NVML

    def __init__(self, nvml, count: int):
        self._nvml = nvml
        self.count = count
        self._closed = False

    @classmethod
    def open(cls) -> NvmlProbe:
        """Initialize NVML; raises ``ImportError`` without pynvml, ``pynvml.NVMLError`` without a driver."""
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError:
            pynvml.nvmlShutdown()
            raise
        return cls(pynvml, count)

    def _optional(self, call, default):
        try:
            return call()
        except self._nvml.NVMLError:
            return default

    def sample_now(self) -> list[GpuSample]:
        """Blocking NVML queries; ``sample`` runs this off the event loop."""
        nvml = self._nvml
        samples = []
        for index in range(self.count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = self._optional(lambda handle=handle: nvml.nvmlDeviceGetUtilizationRates(handle).gpu, 0)
            power_mw = self._optional(lambda handle=handle: nvml.nvmlDeviceGetPowerUsage(handle), 0)
            running = self._optional(lambda handle=handle: nvml.nvmlDeviceGetComputeRunningProcesses(handle), [])
            samples.append(GpuSample(
                index=index,
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                name=_text(nvml.nvmlDeviceGetName(handle)),
                memory_total_bytes=int(memory.total),
                memory_used_bytes=int(memory.used),
                memory_free_bytes=int(memory.free),
                utilization_percent=int(utilization),
                power_watts=int(power_mw) / 1000.0,
                # usedGpuMemory is None where NVML cannot tell (e.g. Windows WDDM): reported as 0.
                processes=tuple(GpuProcess(int(p.pid), int(p.usedGpuMemory or 0)) for p in running),
            ))
        return samples

    async def sample(self, loads: Sequence[GpuLoad] = ()) -> list[GpuSample]:
        return await asyncio.to_thread(self.sample_now)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._optional(self._nvml.nvmlShutdown, None)

    def __repr__(self) -> str:
        return f"NvmlProbe({self.count} GPUs)"


def select_probe(fake_spec: str | None, *, seed: str = "") -> GpuProbe:
    """The probe for this host: ``FakeProbe`` iff ``fake_spec``; else NVML; else ``NoGpuProbe``.

    Blocking (NVML initialization): call it before the event loop or in a
    thread. A bad ``fake_spec`` raises ``ValueError``.
    """
    if fake_spec is not None:
        return FakeProbe(fake_spec, seed=seed)
    try:
        probe = NvmlProbe.open()
    except ImportError:
        return NoGpuProbe("nvidia-ml-py (pynvml) is not installed")
    except Exception as err:  # pynvml.NVMLError and its many subclasses: no library, no driver, ...
        return NoGpuProbe(f"NVML is not available: {_text(err) or type(err).__name__}")
    if probe.count == 0:
        probe.close()
        return NoGpuProbe("NVML found no GPU")
    return probe
