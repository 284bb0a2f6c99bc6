"""Each daemon tells systemd what it is doing (Type=notify): READY=1 only once really ready, with a STATUS,
and STOPPING=1 on SIGTERM. The daemon is a real process; NOTIFY_SOCKET is a real datagram socket read here."""

from __future__ import annotations

import os
import signal
import socket
import uuid

import pytest
from conftest import REPO_ROOT
from mesh_harness import START_TIMEOUT_S, Mesh, Process

from meshserve.node_agent.policy import development_policy_yaml


@pytest.fixture
def systemd_socket():
    """An abstract-namespace datagram socket standing in for systemd's notify socket."""
    name = f"meshserve-notify-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(START_TIMEOUT_S)
    yield sock, {"NOTIFY_SOCKET": "@" + name}
    sock.close()


def next_message(sock: socket.socket) -> dict[str, str]:
    return dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n"))


def test_scheduler_agent_and_proxy_notify_ready_then_stopping(systemd_socket, tmp_path):
    sock, env = systemd_socket
    mesh_ = Mesh()
    try:
        scheduler = Process("scheduler", ["-m", "meshserve.scheduler", "serve", "--listen", "127.0.0.1:0", "--store",
                                          f"sqlite:///{tmp_path / 'state.db'}", "--id", "s1"], env=env)
        mesh_.processes.append(scheduler)
        address = scheduler.wait_listening()
        ready = next_message(sock)
        assert ready["READY"] == "1" and ready["STATUS"].startswith("leader"), ready

        policy = tmp_path / "policy.yaml"
        policy.write_text(development_policy_yaml(REPO_ROOT / "examples"))
        agent = Process("agent", ["-m", "meshserve.node_agent", "--scheduler", address, "--name", "node-a",
                                  "--fake-gpus", "1x8GiB", "--policy", str(policy),
                                  "--state-dir", str(tmp_path / "agent")], env=env)
        mesh_.processes.append(agent)
        ready = next_message(sock)
        assert ready == {"READY": "1", "STATUS": f"registered with scheduler {address}"}, ready

        proxy = Process("proxy", ["-m", "meshserve.proxy", "--scheduler", address, "--listen", "127.0.0.1:0"], env=env)
        mesh_.processes.append(proxy)
        proxy_address = proxy.wait_listening()
        ready = next_message(sock)
        assert ready["READY"] == "1" and ready["STATUS"].startswith(f"serving on {proxy_address}"), ready

        for process in (proxy, agent, scheduler):
            os.kill(process.proc.pid, signal.SIGTERM)
            assert next_message(sock)["STOPPING"] == "1"
            assert process.proc.wait(START_TIMEOUT_S) == 0
    finally:
        mesh_.close()
