"""A port in use is an error for every daemon, never shared (protos/listen.py).

Each test starts a real daemon on a free port, then a second one on the same
address: the second exits non-zero at once, naming the address, and the
first keeps serving. Before the fix gRPC's default SO_REUSEPORT let the
second start and take a share of the connections.
"""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from conftest import EXAMPLES
from daemons import Daemon
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.common.listen import ListenError, bind, grpc_server, listen_socket

# A refused daemon exits before it loads anything; one that shares the port never exits by itself.
REFUSE_TIMEOUT_S = 30.0


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return response.status == health_pb2.HealthCheckResponse.SERVING


def _assert_refused(args: list[str], address: str) -> None:
    second = Daemon(args)
    try:
        code = second.wait_exit(REFUSE_TIMEOUT_S)
        output = second.text()
        assert code is not None, f"the second daemon kept running (the port was shared):\n{output}"
        assert code != 0, output
        assert f"cannot listen on {address}: address already in use" in output, output
        assert "Traceback" not in output, output
    finally:
        second.stop()


def test_runtime_refuses_a_port_in_use_and_names_it():
    args = ["meshserve.runtime", "--model-repository", str(EXAMPLES), "--model", "add_sub", "--event-loop", "asyncio"]
    first = Daemon([*args, "--listen", "127.0.0.1:0"])
    try:
        address = first.wait_listening()
        _assert_refused([*args, "--listen", address], address)
        assert _serving(address)
    finally:
        first.stop()


def test_proxy_refuses_a_port_in_use_and_names_it(tmp_path):
    routes = tmp_path / "routes.txtpb"
    routes.write_text("version: 1\n")
    args = ["meshserve.proxy", "--routes-file", str(routes), "--event-loop", "asyncio"]
    first = Daemon([*args, "--listen", "127.0.0.1:0"])
    try:
        address = first.wait_listening()
        _assert_refused([*args, "--listen", address], address)
        assert _serving(address)
    finally:
        first.stop()


def test_proxy_refuses_a_metrics_port_in_use_and_names_it(tmp_path):
    routes = tmp_path / "routes.txtpb"
    routes.write_text("version: 1\n")
    args = ["meshserve.proxy", "--routes-file", str(routes), "--event-loop", "asyncio", "--listen", "127.0.0.1:0"]
    first = Daemon([*args, "--metrics-listen", "127.0.0.1:0"])
    try:
        metrics = first.wait_for(r"metrics on http://(\S+:\d+)/metrics")
        _assert_refused([*args, "--metrics-listen", metrics], metrics)
        host, port = metrics.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(64).startswith(b"HTTP/1.1 200")
    finally:
        first.stop()


def test_scheduler_refuses_a_port_in_use_and_names_it(tmp_path):
    first = Daemon(["meshserve.scheduler", "serve", "--listen", "127.0.0.1:0",
                    "--store", f"sqlite:///{tmp_path / 'first.db'}", "--id", "first"])
    try:
        address = first.wait_listening()
        _assert_refused(["meshserve.scheduler", "serve", "--listen", address,
                         "--store", f"sqlite:///{tmp_path / 'second.db'}", "--id", "second"], address)
        assert not (tmp_path / "second.db").exists()  # refused before it opened its store
    finally:
        first.stop()


# -- the helper itself ---------------------------------------------------------


def _reuseport_listener() -> socket.socket:
    """A listener as gRPC made them before the fix: SO_REUSEPORT on, inviting a second binder."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_grpc_server_does_not_join_a_port_shared_by_another_listener():
    async def bind_next_to(address: str) -> None:
        server = grpc_server(options=[("grpc.so_reuseport", 1)])  # the helper overrides a caller's option
        try:
            bind(server, address)
        finally:
            await server.stop(None)

    with _reuseport_listener() as holder:
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        with pytest.raises(ListenError, match=f"cannot listen on {address}: address already in use"):
            asyncio.run(bind_next_to(address))


def test_listen_socket_does_not_join_a_port_shared_by_another_listener():
    with _reuseport_listener() as holder:
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        with pytest.raises(ListenError, match=f"cannot listen on {address}: address already in use"):
            listen_socket(address)


@pytest.mark.parametrize("address", ["7070", "host:port", "127.0.0.1:70000"])
def test_listen_socket_refuses_a_malformed_address(address):
    with pytest.raises(ListenError, match="expected HOST:PORT"):
        listen_socket(address)
