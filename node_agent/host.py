"""The host's CPU and memory, as the scheduler's placement sees them.

``read_host_resources`` reads /proc/meminfo where there is one (Linux:
MemAvailable counts reclaimable cache, which is what a new replica can get)
and falls back to ``os.sysconf``. CPU cores are the ones this process may
run on (its affinity mask), which is what a container or a cgroup-limited
systemd unit really has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class HostResources:
    cpu_cores: int
    memory_total_bytes: int
    memory_available_bytes: int


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _meminfo(path: str) -> dict[str, int]:
    values = {}
    with open(path, encoding="ascii") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                values[key] = int(fields[0]) * (1024 if fields[1:2] == ["kB"] else 1)
    return values


def read_host_resources(meminfo_path: str = "/proc/meminfo") -> HostResources:
    """Blocking (a small file read): the agent calls it in a worker thread."""
    try:
        info = _meminfo(meminfo_path)
        total = info["MemTotal"]
        available = info.get("MemAvailable", info.get("MemFree", 0))
    except (OSError, KeyError):
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        available = os.sysconf("SC_AVPHYS_PAGES") * page
    return HostResources(_cpu_cores(), total, available)
