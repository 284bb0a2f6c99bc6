"""A real etcd on loopback for tests: one member or a three-member cluster, ports picked at run time.

Use the fixtures from any test module (pytest finds a fixture by name in the module's namespace)::

    from etcd_server import etcd_endpoint, etcd_server  # noqa: F401  (pytest fixtures)

``etcd_server`` (session scope) is a running :class:`EtcdServer`; ``etcd_endpoint``
is its ``"127.0.0.1:PORT"``. ``etcd_cluster`` (module scope) is a running
:class:`EtcdCluster` of three members. Each test should use its own key prefix:
the server is shared by the whole session.

Where ``etcd`` is not installed (``scripts/install.sh`` installs Debian's
``etcd-server``) the fixtures skip, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
# etcd 3.4 is healthy in well under a second on loopback; a loaded 2-core CI machine
# and a cluster's first election take longer. This bounds a broken start only.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A port the kernel says is free now (bind to port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EtcdServer:
    """One etcd member as a child process; ``start``/``stop``/``kill`` keep its ports and data dir."""

    def __init__(self, name: str = "s1", data_dir: str | None = None, client_port: int | None = None,
                 peer_port: int | None = None, initial_cluster: str | None = None):
        self.name = name
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="meshserve-etcd-")
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.initial_cluster = initial_cluster or f"{name}=http://127.0.0.1:{self.peer_port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.data_dir, f"{name}.log")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def launch(self) -> None:
        """Start the process without waiting for health (a cluster starts all members first)."""
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [ETCD, "--name", self.name, "--data-dir", os.path.join(self.data_dir, self.name),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", self.initial_cluster, "--initial-cluster-state", "new",
             "--initial-cluster-token", f"meshserve-test-{os.getpid()}",
             # Short heartbeats: a killed cluster member is replaced in about a second.
             "--heartbeat-interval", "50", "--election-timeout", "500",
             "--log-level", "warn", "--logger", "zap"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as reply:
                    if b'"true"' in reply.read():
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        output = self.output()
        self.stop()
        raise RuntimeError(f"etcd {self.name} did not become healthy on {self.endpoint}:\n{output}")

    def start(self) -> EtcdServer:
        self.launch()
        self.wait_healthy()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict:
        """This member's maintenance status (member id, raft leader id, ...) from the JSON gateway."""
        request = urllib.request.Request(f"http://{self.endpoint}/v3/maintenance/status", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=5) as reply:
            return json.load(reply)

    def output(self) -> str:
        try:
            with open(self.log_path, errors="replace") as log:
                return log.read()[-4000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: a crash, as the client sees it (connections reset, nothing flushed)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


class EtcdCluster:
    """Three members on loopback; ``members[i].kill()`` takes one down, ``start()`` brings it back."""

    def __init__(self, size: int = 3):
        self.data_dir = tempfile.mkdtemp(prefix="meshserve-etcd-cluster-")
        ports = [(free_port(), free_port()) for _ in range(size)]
        initial = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
        self.members = [EtcdServer(f"m{i}", self.data_dir, client, peer, initial)
                        for i, (client, peer) in enumerate(ports)]

    @property
    def endpoints(self) -> list[str]:
        return [member.endpoint for member in self.members]

    def start(self) -> EtcdCluster:
        for member in self.members:
            member.launch()
        for member in self.members:
            member.wait_healthy()
        return self

    def leader_index(self) -> int:
        """Which member is the raft leader now (asked through etcd's JSON gateway)."""
        statuses = {index: member.status() for index, member in enumerate(self.members) if member.running}
        index_of = {status["header"]["member_id"]: index for index, status in statuses.items()}
        return index_of[next(iter(statuses.values()))["leader"]]

    def cleanup(self) -> None:
        for member in self.members:
            member.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def require_etcd() -> None:
    if not os.access(ETCD, os.X_OK):
        message = "etcd is not installed (scripts/install.sh installs Debian's etcd-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def etcd_server():
    """A running single-member etcd shared by the session; use a key prefix of your own."""
    require_etcd()
    server = EtcdServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def etcd_endpoint(etcd_server):
    """``"127.0.0.1:PORT"`` of the session's etcd."""
    return etcd_server.endpoint


@pytest.fixture(scope="module")
def etcd_cluster():
    """A running three-member etcd cluster for one module."""
    require_etcd()
    cluster = EtcdCluster().start()
    yield cluster
    cluster.cleanup()
