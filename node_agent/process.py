"""The process seam: launching a child, reading its output lines, signalling it, and the clock.

``Launcher.launch`` starts a process and returns a ``ChildProcess``: its pid,
an async iterator of (stream, line) for stdout and stderr together, ``wait()``
for its exit code and ``send_signal``. ``SubprocessLauncher`` is the real side
(asyncio subprocesses); tests pass a fake. ``Clock`` is the other seam the
supervisor waits on (``monotonic`` and ``sleep``), so backoff is testable
without sleeping.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .policy import RunAs


class ChildProcess(Protocol):
    pid: int

    def lines(self) -> AsyncIterator[tuple[str, str]]:
        """("stdout" | "stderr", line without newline) until both streams close. Iterate it once."""

    async def wait(self) -> int:
        """The exit code: negative is the signal that ended it (as in ``subprocess``)."""

    def send_signal(self, signum: int) -> None:
        """Signal the process; a no-op once it has exited."""


class Launcher(Protocol):
    async def launch(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None) -> ChildProcess:
        """Start ``argv`` with exactly ``env``. Raises ``OSError`` if it cannot start."""


class Clock(Protocol):
    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# One output line longer than this is cut: a runaway print must not grow memory without bound.
_LINE_LIMIT_BYTES = 64 * 1024


class _Subprocess:
    def __init__(self, proc: asyncio.subprocess.Process):
        self._proc = proc
        self.pid = proc.pid

    async def _pump(self, name: str, stream: asyncio.StreamReader, queue: asyncio.Queue) -> None:
        try:
            while True:
                try:
                    raw = await stream.readline()
                except ValueError:  # over the limit: asyncio has dropped the line's buffered part
                    await queue.put((name, f"[a line over {_LINE_LIMIT_BYTES} bytes was cut]"))
                    continue
                if not raw:
                    break
                await queue.put((name, raw.decode("utf-8", "replace").rstrip("\r\n")))
        finally:
            await queue.put(None)

    async def lines(self) -> AsyncIterator[tuple[str, str]]:
        queue: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.create_task(self._pump(name, stream, queue))
                 for name, stream in (("stdout", self._proc.stdout), ("stderr", self._proc.stderr))
                 if stream is not None]   # both are pipes (launch)
        try:
            open_streams = len(pumps)
            while open_streams:
                item = await queue.get()
                if item is None:
                    open_streams -= 1
                else:
                    yield item
        finally:
            for pump in pumps:
                pump.cancel()

    async def wait(self) -> int:
        return await self._proc.wait()

    def send_signal(self, signum: int) -> None:
        if self._proc.returncode is None:
            try:
                self._proc.send_signal(signum)
            except ProcessLookupError:
                pass


# Exec'd in the child before the real command (Linux): ask the kernel for SIGTERM
# when the agent dies, so a crashed or SIGKILLed agent leaves no replica
# holding a GPU that nobody accounts for. PR_SET_PDEATHSIG is 1; it survives
# exec. If the agent died before the prctl, exit at once.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('node agent gone before the replica started')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def die_with_parent_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` behind the wrapper that asks for SIGTERM when this process (the agent) dies."""
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


class SubprocessLauncher:
    """Real processes, read through pipes.

    Each child gets its own session, so a Ctrl-C at the agent's terminal
    reaches the agent only, and the agent decides how its replicas stop.
    With ``die_with_parent`` (Linux) a child is sent SIGTERM (it drains) when
    the agent's event-loop thread ends: the pid stays the child's own, as
    the wrapper execs the real command. With ``run_as`` (the host policy's
    user) every child runs as that user and group, with no supplementary
    groups and its own HOME, USER and LOGNAME; with ``switch_user=False``
    the command itself switches (a wrapper inside the replica's systemd scope, node_agent/isolation.py)
    and the launcher only sets those variables.
    """

    def __init__(self, die_with_parent: bool = sys.platform.startswith("linux"), run_as: RunAs | None = None,
                 switch_user: bool = True):
        self.die_with_parent = die_with_parent
        self.run_as = run_as
        self.switch_user = switch_user

    async def launch(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None) -> ChildProcess:
        if self.die_with_parent:
            argv = die_with_parent_argv(argv)
        env = dict(env)
        if self.run_as is not None:
            env.update(HOME=self.run_as.home, USER=self.run_as.name, LOGNAME=self.run_as.name)
        switch = self.run_as if self.switch_user else None   # else the command switches (inside its scope)
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            limit=_LINE_LIMIT_BYTES, start_new_session=True,
            # None: subprocess's own defaults (this process's user, group and groups)
            user=None if switch is None else switch.uid, group=None if switch is None else switch.gid,
            extra_groups=None if switch is None else [],
        )
        return _Subprocess(proc)


def signal_name(code: int) -> str:
    """``-9`` -> ``" (SIGKILL)"``; ``""`` for an ordinary exit code."""
    if code >= 0:
        return ""
    try:
        return f" ({signal.Signals(-code).name})"
    except ValueError:
        return f" (signal {-code})"


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (exited, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            # "pid (comm) S ...": the state follows the last ')' (comm may hold spaces and parentheses).
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True
