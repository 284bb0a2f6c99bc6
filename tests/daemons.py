"""Real daemon processes (``python -m ...``) for tests, with their output awaited line by line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

from conftest import REPO_ROOT

# A daemon imports grpc, numpy and its models on a loaded 2-core machine: bounds a broken start only.
START_TIMEOUT_S = 60.0


class Daemon:
    """``python -m ARGS`` in its own process group, its stdout and stderr collected as they come.

    ``python`` and ``cwd`` default to this interpreter in the repository root; another virtualenv's
    interpreter with a ``cwd`` outside the repository runs what that virtualenv installed, nothing of
    the checkout. ``env`` replaces the environment (PYTHONUNBUFFERED is always set)."""

    def __init__(self, args: list[str], *, python: str = sys.executable, cwd: os.PathLike | str = REPO_ROOT,
                 env: dict[str, str] | None = None):
        self.output: list[str] = []
        self._lines = threading.Condition()
        self._closed = False
        self.proc = subprocess.Popen([python, "-m", *args], cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                     env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._lines:
                self.output.append(line)
                self._lines.notify_all()
        with self._lines:
            self._closed = True
            self._lines.notify_all()

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT_S) -> str:
        """The first group of the first output line matching ``pattern``; fails if the output ends first."""
        regex = re.compile(pattern)
        seen = 0
        with self._lines:
            while True:
                for line in self.output[seen:]:
                    match = regex.search(line)
                    if match:
                        return match.group(1)
                seen = len(self.output)
                if self._closed or not self._lines.wait(timeout):
                    raise AssertionError(f"no line matching {pattern!r} from {self.proc.args}:\n{self.text()}")

    def wait_listening(self) -> str:
        return self.wait_for(r"listening on (\S+:\d+)")

    def wait_exit(self, timeout: float) -> int | None:
        """The exit code, or None if it still runs after ``timeout`` seconds (then it is stopped)."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            return None
        self._reader.join(timeout)  # every line it wrote
        return code

    def text(self) -> str:
        return "".join(self.output)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
