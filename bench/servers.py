"""Servers a benchmark starts and must stop: our runtime, and peers started by script.

Every server binds 127.0.0.1 only. Each class is a context manager whose exit
stops what it started, on success, exception or Ctrl-C alike; call
``stop_on_signals()`` first so that a SIGTERM (or a SIGINT the shell had
masked) unwinds the same way instead of orphaning servers.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

from meshserve.common.ready_line import parse_ready_line

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# A model load on a loaded 2-core machine takes seconds; this bounds a broken start.
STARTUP_TIMEOUT_S = 90.0
# The runtime drains on SIGTERM; in-flight work of a benchmark is done by then.
STOP_GRACE_S = 20.0
# The peer scripts poll readiness for at most 120 s themselves, then print the pid.
PEER_SCRIPT_TIMEOUT_S = 180.0
# The runtime's output is kept to explain a failed start, not to grow with its logs.
OUTPUT_LINES_KEPT = 200


# Signals that arrived while a peer script ran: its server's pid is not known
# until the script returns, so an interrupt then would orphan the server.
_deferral = {"depth": 0, "pending": None}


def stop_on_signals() -> None:
    """Make SIGTERM and SIGINT raise KeyboardInterrupt, so ``with`` blocks stop servers.

    SIGINT is set explicitly because a process started in the background by a
    shell inherits it ignored.
    """

    def handler(signum, frame):
        if _deferral["depth"]:
            _deferral["pending"] = signum
            return
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@contextlib.contextmanager
def _signals_deferred():
    """Hold the interrupt of ``stop_on_signals`` until the block ends (bounded by its timeout)."""
    _deferral["depth"] += 1
    try:
        yield
    finally:
        _deferral["depth"] -= 1
    if not _deferral["depth"] and _deferral["pending"] is not None:
        signum, _deferral["pending"] = _deferral["pending"], None
        raise KeyboardInterrupt(f"signal {signum}")


def free_port(span: int = 1, attempts: int = 50) -> int:
    """A loopback port P such that P .. P+span-1 are free now (peer scripts need a number)."""
    for _ in range(attempts):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.socket())
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port + span - 1 > 65535:
                continue
            try:
                for offset in range(1, span):
                    extra = stack.enter_context(socket.socket())
                    extra.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no run of {span} free loopback ports found")


class RuntimeServer:
    """``python -m meshserve.runtime --model-repository DIR --listen 127.0.0.1:0``, as a context manager.

    ``start()`` returns the address parsed from the runtime's "listening on"
    line; ``stop()`` sends SIGTERM (the runtime drains), waits, then kills the
    process group, which is the server's own (it runs in a new session).
    """

    def __init__(self, model_repository, *extra_args: str, python: str = sys.executable,
                 name: str = "meshserve", startup_timeout_s: float = STARTUP_TIMEOUT_S):
        self.name = name
        self.args = [python, "-m", "meshserve.runtime", "--model-repository", str(model_repository),
                     "--listen", "127.0.0.1:0", *extra_args]
        self.startup_timeout_s = startup_timeout_s
        self.address: str | None = None
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES_KEPT)
        self._listening = threading.Event()
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> str:
        self._proc = subprocess.Popen(
            self.args, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=self._read_output, daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while not self._listening.wait(0.1):
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    tail = "".join(list(self.output)[-20:])
                    raise RuntimeError(f"{self.name} runtime did not start ({' '.join(self.args)}):\n{tail}")
        except BaseException:  # a failed start, or Ctrl-C before ``with`` took it over
            self.stop()
            raise
        return self.address

    def _read_output(self) -> None:
        for line in self._proc.stdout:
            self.output.append(line)
            if self.address is None:
                address = parse_ready_line(line)
                if address is not None:
                    self.address = address
                    self._listening.set()

    def stop(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(proc.pid)  # the leader if it did not drain, and any child it left behind
        proc.wait()
        return proc.returncode

    def __enter__(self) -> RuntimeServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class PeerServer:
    """A peer (Triton, MLServer) started by its outside script ``SCRIPT PORT [REPO]``.

    The script starts the server with setsid, waits for readiness and prints
    its pid on the last line; ``stop()`` signals that pid's process group
    (its model workers with it) and waits for it to go.
    """

    def __init__(self, name: str, script: pathlib.Path, *script_args: str,
                 peers_dir: str | None = None, port_span: int = 3):
        self.name = name
        self.script = pathlib.Path(script)
        self.script_args = list(script_args)
        self.peers_dir = peers_dir
        self.port_span = port_span  # the scripts use PORT (gRPC), PORT+1 (HTTP), PORT+2 (metrics)
        self.address: str | None = None
        self.pid: int | None = None
        self._group = False

    def start(self) -> str:
        port = free_port(self.port_span)
        env = dict(os.environ)
        if self.peers_dir:
            env["PEERS_DIR"] = self.peers_dir
        try:
            with _signals_deferred():
                done = subprocess.run(
                    [str(self.script), str(port), *self.script_args], env=env,
                    stdin=subprocess.DEVNULL, capture_output=True, text=True,
                    timeout=PEER_SCRIPT_TIMEOUT_S,
                )
                lines = done.stdout.strip().splitlines()
                if done.returncode != 0 or not lines or not lines[-1].strip().isdigit():
                    raise RuntimeError(f"{self.name} did not start (exit {done.returncode}):\n"
                                       f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
                self.pid = int(lines[-1])
                self._group = _leads_group(self.pid)
                self.address = f"127.0.0.1:{port}"
        except BaseException:  # an interrupt held during the script: the pid is known now
            self.stop()
            raise
        return self.address

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        send = os.killpg if self._group else os.kill
        with contextlib.suppress(ProcessLookupError, PermissionError):
            send(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        # The leader did not drain in time, or left workers of its group behind.
        if self._group or _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                send(pid, signal.SIGKILL)

    def __enter__(self) -> PeerServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _leads_group(pid: int) -> bool:
    """True when ``pid`` leads its own process group (a setsid server): signal the group."""
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (reparented, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
