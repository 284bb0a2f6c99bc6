"""Shared fixtures: real runtime processes on loopback, port 0.

``start_runtime`` launches ``python -m meshserve.runtime`` as a child process bound to
127.0.0.1:0 and waits for its "listening on" line, which carries the port
the kernel picked. Every process started is stopped at the end of the test.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import threading
import time

import pytest

from meshserve.common.ready_line import parse_ready_line

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples" / "models"
# A model load (onnxruntime import, n-gram training) takes a few seconds on a
# loaded 2-core machine; this bounds a broken start, it is not a performance claim.
STARTUP_TIMEOUT_S = 90.0


def wait_for_line(proc: subprocess.Popen, pattern: str, max_lines: int = 100) -> re.Match | None:
    """The first line of ``proc``'s output matching ``pattern`` (a daemon logs a few lines before its ready
    line); None when the output ends or ``max_lines`` pass without one."""
    for _ in range(max_lines):
        line = proc.stdout.readline()
        if not line:
            return None
        match = re.search(pattern, line)
        if match:
            return match
    return None


class RuntimeProcess:
    """A running ``python -m meshserve.runtime``: its address, its process and its output so far."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.args = args
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshserve.runtime", *args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.address = self._wait_for_address()
        threading.Thread(target=self._drain_output, daemon=True).start()

    def _wait_for_address(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            address = parse_ready_line(line)
            if address is not None:
                return address
        self.stop()
        raise RuntimeError("runtime did not start:\n" + "".join(self.output))

    def _drain_output(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def start_runtime():
    """Factory: ``start_runtime("--model-repository", path, ...)`` -> RuntimeProcess."""
    started: list[RuntimeProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> RuntimeProcess:
        process = RuntimeProcess(["--listen", "127.0.0.1:0", *map(str, args)], env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="module")
def examples_runtime():
    """One runtime serving examples/models, shared by a module's tests."""
    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(EXAMPLES)])
    yield process
    process.stop()


@pytest.fixture
def cluster():
    """A real mesh on loopback (tests/mesh_harness.py); every process it started is stopped after the test."""
    from mesh_harness import Mesh

    mesh_ = Mesh()
    yield mesh_
    mesh_.close()


@pytest.fixture
def etcd():
    """An etcd of the test's own (it may stop and start it), removed after the test."""
    from etcd_server import EtcdServer, require_etcd

    require_etcd()
    server = EtcdServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def loop():
    """An event loop in a thread, for a module's in-process servers (tests/test_proxy_helpers.py)."""
    from test_proxy_helpers import LoopThread

    thread = LoopThread()
    yield thread
    thread.close()
