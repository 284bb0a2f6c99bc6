"""protos/sd_notify.py against real AF_UNIX datagram sockets, as systemd listens (a path and the abstract namespace)."""

from __future__ import annotations

import os
import socket

import pytest

from meshserve.common.sd_notify import MAX_STATUS_CHARS, Notifier


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
        env_value = address
    else:
        name = f"meshserve-test-{os.getpid()}-{id(sock)}"
        sock.bind(b"\0" + name.encode())
        env_value = "@" + name
    sock.settimeout(5)
    yield sock, env_value
    sock.close()


def received(sock: socket.socket) -> dict[str, str]:
    return dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n"))


def test_ready_status_watchdog_and_stopping_arrive_as_systemd_reads_them(listener):
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.ready("leader; 3/3 replicas ready")
    assert received(sock) == {"READY": "1", "STATUS": "leader; 3/3 replicas ready"}
    assert notifier.watchdog()
    assert received(sock) == {"WATCHDOG": "1"}
    assert notifier.stopping(extend_timeout_s=35)
    assert received(sock) == {"STOPPING": "1", "EXTEND_TIMEOUT_USEC": "35000000"}
    notifier.close()


def test_a_status_cannot_inject_another_assignment_and_is_bounded(listener):
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.status("fine\nREADY=1\nMAINPID=1" + "x" * 5000)
    message = received(sock)
    assert set(message) == {"STATUS"}
    assert message["STATUS"].startswith("fine READY=1 MAINPID=1") and len(message["STATUS"]) == MAX_STATUS_CHARS
    notifier.close()


def test_without_notify_socket_nothing_is_sent_and_a_missing_socket_is_not_an_error(tmp_path):
    assert not Notifier({}).ready()
    assert not Notifier({}).enabled
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert gone.enabled and not gone.ready() and not gone.watchdog()


def test_the_watchdog_interval_is_half_of_systemds_and_only_for_this_process():
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "10000000"}).watchdog_interval_s == 5.0
    assert Notifier({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 5.0
    assert Notifier({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "junk"}).watchdog_interval_s is None
    assert Notifier({}).watchdog_interval_s is None
