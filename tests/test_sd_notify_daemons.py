"""Each daemon tells systemd what it is doing (Type=notify): READY=1 only once really ready, STATUS lines an
operator reads in `systemctl status`, WATCHDOG=1 from its event loop, and on SIGTERM STOPPING=1 with
EXTEND_TIMEOUT_USEC while it drains. The daemons are real processes; each has its own NOTIFY_SOCKET, a real
datagram socket read here."""

from __future__ import annotations

import os
import queue
import signal
import socket
import threading
import time
import uuid

import pytest
from conftest import REPO_ROOT
from mesh_harness import START_TIMEOUT_S, Mesh, Process

from meshserve.node_agent.policy import development_policy_yaml

# systemd's WatchdogSec in microseconds: the daemons ping every half of it.
WATCHDOG_USEC = 400_000
PAUSE_S = 2.0      # ten ping intervals


class Systemd:
    """An abstract-namespace datagram socket standing in for one unit's notify socket, read at once by a
    thread as systemd reads it (the kernel queues only a few datagrams: net.unix.max_dgram_qlen)."""

    def __init__(self):
        name = f"meshserve-notify-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + name.encode())
        self.sock.settimeout(0.2)
        self.env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        self.seen: list[dict[str, str]] = []
        self._queue: queue.Queue[dict[str, str]] = queue.Queue()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self._queue.put(dict(line.split("=", 1) for line in data.decode().split("\n")))

    def next(self) -> dict[str, str]:
        try:
            message = self._queue.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"nothing from the daemon in {START_TIMEOUT_S:g}s; the last: {self.seen[-5:]}") from None
        self.seen.append(message)
        return message

    def until(self, predicate, what: str, limit: int = 2000) -> dict[str, str]:
        """The first message that satisfies ``predicate`` (each read waits at most START_TIMEOUT_S)."""
        for _ in range(limit):
            message = self.next()
            if predicate(message):
                return message
        raise AssertionError(f"no {what} in {limit} messages; the last: {self.seen[-5:]}")

    def pending(self) -> list[dict[str, str]]:
        messages = []
        while True:
            try:
                messages.append(self._queue.get_nowait())
            except queue.Empty:
                return messages

    def close(self) -> None:
        self._closed.set()
        self._reader.join(5)
        self.sock.close()


@pytest.fixture
def systemd():
    made: list[Systemd] = []

    def make() -> Systemd:
        made.append(Systemd())
        return made[-1]

    yield make
    for one in made:
        one.close()


def wait_stopped(pid: int) -> None:
    """Until the kernel has stopped ``pid`` (state T), bounded."""
    for _ in range(500):
        with open(f"/proc/{pid}/stat", "rb") as handle:
            if handle.read().rsplit(b")", 1)[1].split()[0] == b"T":
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop")


def test_daemons_notify_ready_status_watchdog_then_stopping_with_extend_timeout(systemd, tmp_path):
    scheduler_unit, agent_unit, proxy_unit = systemd(), systemd(), systemd()
    mesh_ = Mesh()
    try:
        scheduler = Process("scheduler", ["-m", "meshserve.scheduler", "serve", "--listen", "127.0.0.1:0", "--store",
                                          f"sqlite:///{tmp_path / 'state.db'}", "--id", "s1"], env=scheduler_unit.env)
        mesh_.processes.append(scheduler)
        address = scheduler.wait_listening()
        ready = scheduler_unit.until(lambda m: "READY" in m, "READY")
        assert ready["READY"] == "1" and ready["STATUS"].startswith("leader"), ready
        scheduler_unit.until(lambda m: m == {"WATCHDOG": "1"}, "watchdog ping")

        policy = tmp_path / "policy.yaml"
        policy.write_text(development_policy_yaml(REPO_ROOT / "examples"))
        agent = Process("agent", ["-m", "meshserve.node_agent", "--scheduler", address, "--name", "node-a",
                                  "--fake-gpus", "1x8GiB", "--policy", str(policy),
                                  "--state-dir", str(tmp_path / "agent")], env=agent_unit.env)
        mesh_.processes.append(agent)
        ready = agent_unit.until(lambda m: "READY" in m, "READY")
        assert ready == {"READY": "1", "STATUS": f"registered with scheduler {address}"}, ready
        status = agent_unit.until(lambda m: "STATUS" in m, "STATUS")
        assert status["STATUS"] == f"registered with scheduler {address}; no replicas", status
        status = scheduler_unit.until(lambda m: "nodes 1/1 ready" in m.get("STATUS", ""), "a STATUS with the node")
        assert "replicas 0/0 ready in 0 deployment(s); 0 route(s)" in status["STATUS"], status

        proxy = Process("proxy", ["-m", "meshserve.proxy", "--scheduler", address, "--listen", "127.0.0.1:0"],
                        env=proxy_unit.env)
        mesh_.processes.append(proxy)
        proxy_address = proxy.wait_listening()
        ready = proxy_unit.until(lambda m: "READY" in m, "READY")
        assert ready["READY"] == "1" and ready["STATUS"].startswith(f"serving on {proxy_address}"), ready
        proxy_unit.until(lambda m: m == {"WATCHDOG": "1"}, "watchdog ping")

        for unit, process in ((proxy_unit, proxy), (agent_unit, agent), (scheduler_unit, scheduler)):
            os.kill(process.proc.pid, signal.SIGTERM)
            stopping = unit.until(lambda m: "STOPPING" in m, "STOPPING")
            assert stopping["STOPPING"] == "1" and int(stopping["EXTEND_TIMEOUT_USEC"]) > 0, stopping
            assert stopping["STATUS"].startswith(("draining", "stopping")), stopping
            assert process.proc.wait(START_TIMEOUT_S) == 0
            assert not any("WATCHDOG" in m for m in unit.pending())     # no ping once stopping
    finally:
        mesh_.close()


def test_watchdog_pings_stop_while_a_daemon_is_frozen_and_resume_after(systemd, tmp_path):
    """SIGSTOP freezes the scheduler's event loop with the rest of it: systemd would see no ping for
    WatchdogSec and restart the unit. (tests/test_sd_notify.py blocks the loop alone, in process.)"""
    unit = systemd()
    scheduler = Process("scheduler", ["-m", "meshserve.scheduler", "serve", "--listen", "127.0.0.1:0", "--store",
                                      f"sqlite:///{tmp_path / 'state.db'}", "--id", "s1"], env=unit.env)
    try:
        scheduler.wait_listening()
        unit.until(lambda m: "READY" in m, "READY")
        unit.until(lambda m: m == {"WATCHDOG": "1"}, "watchdog ping")
        scheduler.pause()
        wait_stopped(scheduler.proc.pid)
        time.sleep(0.5)                                  # the reader takes what was sent before the stop
        unit.pending()
        time.sleep(PAUSE_S)
        assert unit.pending() == []
        scheduler.resume()
        unit.until(lambda m: m == {"WATCHDOG": "1"}, "watchdog ping after SIGCONT")
    finally:
        scheduler.stop()
