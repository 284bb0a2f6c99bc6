"""protos/sd_notify.py against real AF_UNIX datagram sockets, as systemd listens (a path and the abstract namespace)."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from meshserve.common import sd_notify
from meshserve.common.sd_notify import MAX_STATUS_CHARS, Notifier, announce, draining


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


# ---------------------------------------------------------------- announce and draining, on a real event loop


def pending(sock: socket.socket) -> list[dict[str, str]]:
    """Every datagram already queued on ``sock``, without waiting."""
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n")))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5)
    return messages


def test_watchdog_pings_come_from_the_event_loop_and_stop_while_it_is_blocked(listener):
    """The loop is blocked for 25 watchdog intervals by a callback on it: a thread would have pinged
    meanwhile; the loop's own task cannot, and pings again once the loop runs."""
    sock, path = listener
    interval_s = 0.04
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(int(interval_s * 2e6))})
    seen_while_blocked: list[dict[str, str]] = []

    async def ready() -> str:
        return "up"

    def block_the_loop() -> None:
        pending(sock)                                  # what was sent before the block
        time.sleep(25 * interval_s)                    # the event loop's thread is busy: nothing runs on it
        seen_while_blocked.extend(pending(sock))

    async def main():
        task = asyncio.create_task(announce(notifier, ready()))
        try:
            async with asyncio.timeout(30):
                assert await asyncio.to_thread(received, sock) == {"READY": "1", "STATUS": "up"}
                assert await asyncio.to_thread(received, sock) == {"WATCHDOG": "1"}
                asyncio.get_running_loop().call_soon(block_the_loop)
                await asyncio.sleep(0)
                assert await asyncio.to_thread(received, sock) == {"WATCHDOG": "1"}   # pings again afterwards
        finally:
            task.cancel()

    asyncio.run(main())
    assert seen_while_blocked == []
    notifier.close()


def test_status_is_sent_when_it_changes_only(listener, monkeypatch):
    sock, path = listener
    monkeypatch.setattr(sd_notify, "STATUS_INTERVAL_S", 0.02)
    notifier = Notifier({"NOTIFY_SOCKET": path})
    texts = iter(["a", "a", "b", "b", "b", "c"])
    current = ["a"]

    def status() -> str:
        current[0] = next(texts, current[0])
        return current[0]

    async def ready() -> str:
        return "a"

    async def main():
        task = asyncio.create_task(announce(notifier, ready(), status))
        try:
            async with asyncio.timeout(30):
                assert await asyncio.to_thread(received, sock) == {"READY": "1", "STATUS": "a"}
                assert await asyncio.to_thread(received, sock) == {"STATUS": "b"}
                assert await asyncio.to_thread(received, sock) == {"STATUS": "c"}
                await asyncio.sleep(0.2)                # "c" from now on: nothing more is sent
        finally:
            task.cancel()

    asyncio.run(main())
    assert pending(sock) == []
    notifier.close()


def test_draining_says_stopping_and_extends_the_timeout_until_the_drain_ends(listener):
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    left = [3]

    async def main():
        async with draining(notifier, lambda: f"draining: {left[0]} left", window_s=0.06):
            for _ in range(3):
                await asyncio.sleep(0.05)
                left[0] -= 1

    asyncio.run(main())
    messages = pending(sock)
    assert messages[0] == {"STOPPING": "1", "STATUS": "draining: 3 left", "EXTEND_TIMEOUT_USEC": "60000"}
    assert len(messages) >= 2 and all(m["EXTEND_TIMEOUT_USEC"] == "60000" for m in messages[1:])
    time.sleep(0.2)
    assert pending(sock) == []                          # nothing once the drain is over
    notifier.close()
