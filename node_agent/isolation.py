"""Per-replica isolation: the memory and CPU limits a replica's process runs under, and why it died.

The scheduler books ``resources.memory`` and ``resources.cpu`` for each
replica and sends them as ``MESHSERVE_MEMORY_BYTES`` and
``MESHSERVE_CPU_CORES`` (common/assignment_env.py). The agent enforces them
with the strategy chosen once at start (``node-agent --isolation``):

- ``systemd``: each replica process runs in its own transient scope,
  ``systemd-run --scope --unit meshserve-replica-<id>`` with
  ``MemoryMax`` (and ``MemorySwapMax=0``, so a leak ends in the OOM killer,
  not in swapping the host to a halt) and ``CPUQuota`` (cores x 100 %: a
  replica gets at most the cores it booked, so its latency is the same on a
  busy host as on an idle one), and the agent unit's device policy (only the
  NVIDIA devices), which a scope, outside the agent's cgroup, would lose.
  The kernel OOM-kills a replica past its memory; the scope's ``Result``
  (``oom-kill``) or its cgroup's ``memory.events`` ``oom_kill`` counter tells
  the agent, and the replica's message says ``oom-killed: memory limit 1 GiB``. ``systemd-run`` rather
  than a D-Bus library: it is systemd's own maintained client, present
  wherever the manager is, and adds no dependency to the agent.
- ``rlimit``: the nearest equivalent without systemd. ``RLIMIT_DATA`` (not
  ``RLIMIT_AS``): since Linux 4.7 it counts every private writable mapping
  (heap, numpy buffers, thread stacks) but not ``PROT_NONE`` address-space
  reservations, which CUDA, onnxruntime and JAX make by the gigabyte and
  which ``RLIMIT_AS`` would refuse. An allocation past the limit fails
  (``MemoryError``) instead of growing; a replica that dies of it is reported
  as ``exceeded its memory limit: 1 GiB (RLIMIT_DATA)``. No CPU limit: no
  rlimit bounds a share of CPU (``RLIMIT_CPU`` kills after N CPU-seconds).
- ``none``: no limits (library use, tests with fake launchers).

``auto`` picks ``systemd`` when ``systemd-run --scope`` actually works here
(a system manager for a root agent, the user's manager otherwise), else
``rlimit``, and logs one line saying which and why. ``systemd`` asked for
and unavailable is refused at start with the reason: never a silent
fallback.

Guarantees: a replica with no (or an unreadable) booked memory or CPU gets
no limit for it, and the log says so once per spec; unit names are built
from the replica id by escaping, so a hostile id cannot name another unit
or inject an argument (argv is never passed through a shell).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from meshserve.common.assignment_env import CPU_ENV, MEMORY_ENV
from meshserve.common.sizes import parse_size

from .process import die_with_parent_argv

log = logging.getLogger(__name__)

MODES = ("auto", "systemd", "rlimit", "none")
UNIT_PREFIX = "meshserve-replica-"
# How long the systemd probe and the after-exit queries may take: a hung bus must not hold up the agent.
SYSTEMCTL_TIMEOUT_S = 10.0
# What a process killed by a failed allocation under RLIMIT_DATA leaves in its last output.
_ALLOCATION_FAILED = ("MemoryError", "Unable to allocate", "Cannot allocate memory", "bad_alloc",
                      "out of memory", "Memory allocation")   # the last: OpenBLAS's buffers at import
# A scope leaves the agent's cgroup, and with it the device policy of deploy/systemd/meshserve-node-agent.service:
# each scope gets the same one again (DevicePolicy=closed still allows /dev/null, zero, random, tty and the like).
SCOPE_DEVICE_PROPERTIES = (
    "DevicePolicy=closed",
    "DeviceAllow=/dev/nvidiactl rw", "DeviceAllow=/dev/nvidia-uvm rw", "DeviceAllow=/dev/nvidia-uvm-tools rw",
    "DeviceAllow=/dev/nvidia-modeset rw", "DeviceAllow=char-nvidia rw", "DeviceAllow=char-nvidia-caps rw",
)
_UNIT_SAFE = re.compile(r"[A-Za-z0-9_.]")
_UNIT_NAME_MAX = 255
# Past these a value is nonsense (and would not fit an rlimit or CPUQuota): no limit, logged.
_MAX_MEMORY_BYTES = 2**60
_MAX_CPU_CORES = 1 << 16


class IsolationUnavailable(RuntimeError):
    """The asked-for strategy cannot work on this host; the message says why. The agent does not start."""


@dataclass(frozen=True)
class ReplicaLimits:
    """What one replica booked: bytes of host memory and CPU cores; None means nothing booked (no limit)."""

    memory_bytes: int | None = None
    cpu_cores: float | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], replica_id: str = "") -> ReplicaLimits:
        """Read the assignment env; an unreadable or zero value is no limit (logged)."""
        memory = cpu = None
        raw_memory, raw_cpu = env.get(MEMORY_ENV), env.get(CPU_ENV)
        if raw_memory is not None:
            try:
                memory = parse_size(raw_memory) or None
                if memory is not None and memory > _MAX_MEMORY_BYTES:
                    raise ValueError("more than any host has")
            except ValueError:
                memory = None
                log.warning("replica %s: unreadable %s=%r: no memory limit", replica_id, MEMORY_ENV,
                            raw_memory[:40])
        if raw_cpu is not None:
            try:
                cpu = float(raw_cpu)
            except ValueError:
                cpu = math.nan
            if not math.isfinite(cpu) or cpu < 0 or cpu > _MAX_CPU_CORES:
                log.warning("replica %s: unreadable %s=%r: no CPU limit", replica_id, CPU_ENV, raw_cpu[:40])
                cpu = None
            cpu = cpu or None
        return cls(memory, cpu)


def shown_size(size: int) -> str:
    """``1073741824`` -> ``"1 GiB"``; ``"1500000 bytes"`` where no binary unit divides it."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


def unit_name(replica_id: str) -> str:
    """The scope of a replica: ``meshserve-replica-<id>.scope``, every byte of the id outside
    ``[A-Za-z0-9_.]`` escaped as ``\\xNN`` (systemd's own escape); an over-long name ends in a hash."""
    escaped = "".join(ch if _UNIT_SAFE.fullmatch(ch) else "".join(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
                      for ch in replica_id)
    name = f"{UNIT_PREFIX}{escaped}"
    if len(name) + len(".scope") > _UNIT_NAME_MAX:
        digest = hashlib.sha256(replica_id.encode()).hexdigest()[:16]
        name = f"{name[:_UNIT_NAME_MAX - len('.scope') - 17]}-{digest}"
    return f"{name}.scope"


def oom_kills(memory_events: str) -> int:
    """The ``oom_kill`` count of a cgroup v2 ``memory.events`` file's text (0 when absent or unreadable)."""
    for line in memory_events.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def allocation_failed(tail: Sequence[str]) -> bool:
    """Whether a process's last output shows a failed memory allocation."""
    return any(marker in line for line in tail for marker in _ALLOCATION_FAILED)


class Isolation(Protocol):
    name: str

    def wrap(self, argv: Sequence[str], limits: ReplicaLimits, replica_id: str) -> list[str]:
        """The command that runs ``argv`` under ``limits``."""

    async def exit_reason(self, code: int, limits: ReplicaLimits, replica_id: str, tail: Sequence[str]) -> str | None:
        """Why the process ended, when the limits explain it (``"oom-killed: memory limit 1 GiB"``), else None.
        Also releases what the launch left behind (a failed scope)."""


class NoIsolation:
    """No limits."""

    name = "none"

    def wrap(self, argv: Sequence[str], limits: ReplicaLimits, replica_id: str) -> list[str]:
        return list(argv)

    async def exit_reason(self, code: int, limits: ReplicaLimits, replica_id: str, tail: Sequence[str]) -> str | None:
        return None


# Exec'd before the replica: lower RLIMIT_DATA (never above the hard limit in force), then exec the
# command. A wrapper, not preexec_fn (unsafe in a threaded process) nor prlimit(1) (util-linux may be
# absent): the agent's own interpreter is the one binary certain to be here.
_SET_RLIMIT_DATA = (
    "import os, resource, sys\n"
    "limit = int(sys.argv[1])\n"
    "hard = resource.getrlimit(resource.RLIMIT_DATA)[1]\n"
    "limit = limit if hard == resource.RLIM_INFINITY else min(limit, hard)\n"
    "resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class RlimitIsolation:
    """``RLIMIT_DATA`` from the booked memory; no CPU limit (see the module docstring)."""

    name = "rlimit"

    def __init__(self, python: str = sys.executable):
        self.python = python

    def wrap(self, argv: Sequence[str], limits: ReplicaLimits, replica_id: str) -> list[str]:
        if limits.memory_bytes is None:
            return list(argv)
        return [self.python, "-c", _SET_RLIMIT_DATA, str(limits.memory_bytes), *argv]

    async def exit_reason(self, code: int, limits: ReplicaLimits, replica_id: str, tail: Sequence[str]) -> str | None:
        if limits.memory_bytes is None or code == 0 or not allocation_failed(tail):
            return None
        return f"exceeded its memory limit: {shown_size(limits.memory_bytes)} (RLIMIT_DATA)"


# Exec'd inside a replica's scope when it runs as another user: what the launcher does without a scope
# (asyncio's user=, group=, extra_groups=[]), in the order that leaves no way back.
_AS_USER = (
    "import os, sys\n"
    "uid, gid = int(sys.argv[1]), int(sys.argv[2])\n"
    "os.setgroups([])\n"
    "os.setresgid(gid, gid, gid)\n"
    "os.setresuid(uid, uid, uid)\n"
    "os.execvp(sys.argv[3], sys.argv[3:])\n"
)


class SystemdIsolation:
    """A transient scope per replica process, under the system manager (``user=False``) or the agent user's.

    ``uid``/``gid``: the user the replica runs as. A non-root ``systemd-run`` cannot reach the system
    manager, so the launcher does not switch; a wrapper inside the scope does, as the launcher would (no
    supplementary groups: ``systemd-run --uid`` would keep root's), then sets the parent-death signal
    again (a change of user clears it). ``expand_flag``: this ``systemd-run`` knows
    ``--expand-environment`` (systemd 254+): ``no``, so a ``$`` in a replica's arguments stays a ``$``.
    """

    name = "systemd"

    def __init__(self, user: bool = False, uid: int | None = None, gid: int | None = None,
                 systemd_run: str = "systemd-run", systemctl: str = "systemctl", expand_flag: bool = False):
        self.user = user
        self.uid, self.gid = uid, gid
        self.expand_flag = expand_flag
        self.systemd_run, self.systemctl = systemd_run, systemctl

    @property
    def switches_user(self) -> bool:
        return self.uid is not None

    def _manager(self) -> list[str]:
        return ["--user"] if self.user else []

    def wrap(self, argv: Sequence[str], limits: ReplicaLimits, replica_id: str) -> list[str]:
        # No --collect: an OOM-killed scope must stay (failed) until exit_reason has read its Result.
        command = [self.systemd_run, *self._manager(), "--scope", "--quiet",
                   *(["--expand-environment=no"] if self.expand_flag else []),
                   f"--unit={unit_name(replica_id)}", "--description=meshserve replica",
                   *(f"--property={prop}" for prop in SCOPE_DEVICE_PROPERTIES)]
        if limits.memory_bytes is not None:
            command += [f"--property=MemoryMax={limits.memory_bytes}", "--property=MemorySwapMax=0"]
        if limits.cpu_cores is not None:
            command.append(f"--property=CPUQuota={max(1, math.ceil(limits.cpu_cores * 100))}%")
        if self.uid is not None:
            gid = self.gid if self.gid is not None else self.uid
            argv = [sys.executable, "-c", _AS_USER, str(self.uid), str(gid), *die_with_parent_argv(argv)]
        return [*command, "--", *argv]

    async def exit_reason(self, code: int, limits: ReplicaLimits, replica_id: str, tail: Sequence[str]) -> str | None:
        unit = unit_name(replica_id)
        shown = await self._systemctl("show", "--property=Result,ControlGroup", unit)
        properties = dict(line.partition("=")[::2] for line in shown.splitlines())
        oom = properties.get("Result") == "oom-kill"
        if properties.get("ControlGroup"):   # still there: a process of the scope lingers
            events = await asyncio.to_thread(_read, f"/sys/fs/cgroup{properties['ControlGroup']}/memory.events")
            oom = oom or oom_kills(events) > 0
            await self._systemctl("stop", "--no-block", unit)   # at most one process tree per replica
        if properties.get("Result", "success") != "success":
            await self._systemctl("reset-failed", unit)   # free the name for the next launch
        if not oom:
            return None
        limit = f"memory limit {shown_size(limits.memory_bytes)}" if limits.memory_bytes else "no memory limit"
        return f"oom-killed: {limit}"

    async def _systemctl(self, *args: str) -> str:
        """systemctl's stdout; "" when it fails (the unit is gone, the bus is down): never raises."""
        return await run_quiet([self.systemctl, *self._manager(), *args])


async def run_quiet(argv: Sequence[str], timeout_s: float = SYSTEMCTL_TIMEOUT_S) -> str:
    """Run ``argv``; its stdout when it exits 0 within ``timeout_s``, else ""."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
    except OSError:
        return ""
    try:
        async with asyncio.timeout(timeout_s):
            out, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        return ""
    return out.decode("utf-8", "replace") if process.returncode == 0 else ""


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read(4096)
    except OSError:
        return ""


async def systemd_problem(user: bool, systemd_run: str = "systemd-run") -> str | None:
    """None when ``systemd-run --scope`` works here; else why not (its own words)."""
    if not await asyncio.to_thread(os.path.isdir, "/run/systemd/system"):
        return "this host was not booted with systemd (no /run/systemd/system)"
    argv = [systemd_run, *(["--user"] if user else []), "--scope", "--quiet", "--collect", "true"]
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
    except OSError as err:
        return f"cannot run {systemd_run}: {err.strerror}"
    try:
        async with asyncio.timeout(SYSTEMCTL_TIMEOUT_S):
            _, err_text = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        return f"{' '.join(argv)} did not finish within {SYSTEMCTL_TIMEOUT_S:g}s"
    if process.returncode != 0:
        said = err_text.decode("utf-8", "replace").strip().splitlines()
        return f"{' '.join(argv)} failed: {said[-1] if said else f'exit code {process.returncode}'}"
    return None


async def choose_isolation(mode: str, *, run_as_uid: int | None = None, run_as_gid: int | None = None,
                           euid: int | None = None, systemd_run: str = "systemd-run") -> Isolation:
    """The strategy for ``--isolation MODE``, with one log line saying which and why.

    ``systemd`` that cannot work raises ``IsolationUnavailable``; ``auto`` then falls back to ``rlimit``.
    A root agent uses the system manager (and switches to the replica user inside the scope); any other
    agent the user's manager.
    """
    if mode not in MODES:
        raise IsolationUnavailable(f"unknown isolation {mode!r} (one of {', '.join(MODES)})")
    if mode == "none":
        log.warning("replica isolation: none (--isolation none): replicas run without memory or CPU limits")
        return NoIsolation()
    if mode == "rlimit":
        log.info("replica isolation: rlimit (--isolation rlimit): RLIMIT_DATA from each replica's memory; "
                 "no CPU limit")
        return RlimitIsolation()
    root = (os.geteuid() if euid is None else euid) == 0
    problem = await systemd_problem(user=not root, systemd_run=systemd_run)
    if problem is None:
        switch = run_as_uid is not None and root and run_as_uid != 0
        log.info("replica isolation: systemd (%s manager): a scope per replica with MemoryMax and CPUQuota",
                 "system" if root else "user")
        # Scopes an earlier agent left failed (OOM-killed, then the agent died) would block their names.
        await run_quiet(["systemctl", *([] if root else ["--user"]), "reset-failed", f"{UNIT_PREFIX}*.scope"])
        return SystemdIsolation(user=not root, uid=run_as_uid if switch else None,
                                gid=run_as_gid if switch else None, systemd_run=systemd_run,
                                expand_flag="--expand-environment" in await run_quiet([systemd_run, "--help"]))
    if mode == "systemd":
        raise IsolationUnavailable(f"--isolation systemd: {problem}")
    log.warning("replica isolation: rlimit, not systemd (%s): RLIMIT_DATA from each replica's memory; "
                "no CPU limit", problem)
    return RlimitIsolation()
