"""TLS on the data plane with real handshakes on loopback: client -> runtime, client -> proxy -> runtime.

Every server here is the real one (``RuntimeServer``, ``ProxyServer``) on
127.0.0.1:0 with certificates from ``scheduler ctl certs``' functions; a
refused handshake reaches the client as UNAVAILABLE (``clients.Unavailable``).
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import subprocess
import sys
from concurrent import futures

import grpc
import numpy as np
import pytest
from test_proxy_helpers import LoopThread, route
from tls_pki import Pki

from meshserve.clients import AsyncInferenceClient, InferenceClient, Unavailable
from meshserve.common.security.tls import TlsConfig, TlsError, add_port, add_tls_arguments, is_loopback
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.proxy import ProxyOptions, ProxyServer
from meshserve.proxy.routes import RouteTable
from meshserve.runtime.server import RuntimeServer, ServerOptions

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples" / "models"
CALL_TIMEOUT_S = 10.0   # bounds a hung call; a refused handshake fails in milliseconds


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    """A second, unrelated CA: what an attacker or a misconfigured host has."""
    return Pki(tmp_path_factory.mktemp("other-ca"))


class Runtime:
    """A RuntimeServer serving add_sub on 127.0.0.1:0 with ``tls``."""

    def __init__(self, loop: LoopThread, tls: TlsConfig | None):
        self.loop = loop
        self.server = loop.run(self._start(ServerOptions(repository=str(EXAMPLES), models=["add_sub"],
                                                         listen="127.0.0.1:0", tls=tls)))
        self.address = self.server.address

    @staticmethod
    async def _start(options: ServerOptions) -> RuntimeServer:
        server = RuntimeServer(options)
        await server.start()
        return server

    def close(self) -> None:
        self.loop.run(self.server.drain())
        self.loop.run(self.server.repository.close())


def _add_sub(address: str, tls: TlsConfig | None) -> np.ndarray:
    a = np.arange(16, dtype=np.float32)[None, :]
    with InferenceClient(address, tls=tls or TlsConfig(), timeout=CALL_TIMEOUT_S, retries=0) as client:
        return client.infer("add_sub", {"INPUT0": a, "INPUT1": np.ones_like(a)})["OUTPUT0"]


@pytest.fixture
def runtimes(loop):
    started: list[Runtime] = []

    def start(tls: TlsConfig | None) -> Runtime:
        started.append(Runtime(loop, tls))
        return started[-1]
    yield start
    for runtime in started:
        runtime.close()


def test_client_reaches_runtime_over_tls_and_plaintext_is_refused(pki, runtimes):
    runtime = runtimes(pki.tls("node-a", "agent"))
    assert _add_sub(runtime.address, TlsConfig(ca=pki.ca))[0, :3].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(Unavailable):
        _add_sub(runtime.address, None)      # a plaintext client gets no answer from a TLS server


def test_mutual_tls_refuses_a_client_without_a_certificate(pki, runtimes):
    runtime = runtimes(pki.tls("node-a", "agent", require_client_cert=True))
    with pytest.raises(Unavailable):
        _add_sub(runtime.address, TlsConfig(ca=pki.ca))
    assert _add_sub(runtime.address, pki.tls("client-1"))[0, 0] == 1.0


def test_client_refuses_a_server_signed_by_another_ca(pki, other_pki, runtimes):
    runtime = runtimes(other_pki.tls("impostor", "agent"))
    with pytest.raises(Unavailable):
        _add_sub(runtime.address, pki.tls("client-1"))


def test_mutual_tls_refuses_a_client_certificate_from_another_ca(pki, other_pki, runtimes):
    runtime = runtimes(pki.tls("node-a", "agent", require_client_cert=True))
    stranger = other_pki.issue("client-1")
    with pytest.raises(Unavailable):
        _add_sub(runtime.address, TlsConfig(ca=pki.ca, cert=str(stranger.cert), key=str(stranger.key)))


def test_expired_server_certificate_is_refused(pki, runtimes):
    runtime = runtimes(pki.tls("node-old", "agent", expired=True))
    with pytest.raises(Unavailable):
        _add_sub(runtime.address, TlsConfig(ca=pki.ca))


def test_expired_client_certificate_is_refused(pki, runtimes):
    runtime = runtimes(pki.tls("node-a", "agent", require_client_cert=True))
    with pytest.raises(Unavailable):
        _add_sub(runtime.address, pki.tls("client-old", expired=True))


def test_proxy_forwards_to_runtime_over_mutual_tls(pki, loop, runtimes):
    runtime = runtimes(pki.tls("node-a", "agent", require_client_cert=True))
    table = RouteTable.from_proto(mesh.RouteTable(version=1, routes=[route("add_sub", ("r1", runtime.address))]))
    options = ProxyOptions(listen="127.0.0.1:0", routes=table,
                           tls=pki.tls("proxy-1", "proxy", require_client_cert=True))

    async def start() -> ProxyServer:
        proxy = ProxyServer(options)
        await proxy.start()
        return proxy
    proxy = loop.run(start())
    try:
        assert _add_sub(proxy.address, pki.tls("client-1"))[0, 0] == 1.0     # client -> proxy -> runtime, mTLS
        with pytest.raises(Unavailable):
            _add_sub(proxy.address, TlsConfig(ca=pki.ca))                    # no client certificate
        # The proxy's channel to the replica presented the proxy's certificate: the replica requires one.
        assert loop.call(lambda: proxy.pool.get(runtime.address).healthy)
    finally:
        loop.run(proxy.stop(0))


def test_proxy_without_client_certificate_cannot_reach_mutual_tls_runtime(pki, loop, runtimes):
    runtime = runtimes(pki.tls("node-a", "agent", require_client_cert=True))
    table = RouteTable.from_proto(mesh.RouteTable(version=1, routes=[route("add_sub", ("r1", runtime.address))]))

    async def start() -> ProxyServer:
        proxy = ProxyServer(ProxyOptions(listen="127.0.0.1:0", routes=table, max_retries=0,
                                         tls=TlsConfig(ca=pki.ca)))
        await proxy.start()
        return proxy
    with pytest.raises(TlsError, match="needs its own certificate"):
        loop.run(start())                    # TLS configured, but nothing to serve with: refused at startup


# -- settings ---------------------------------------------------------------------------------------------


def test_plaintext_on_a_non_loopback_address_needs_insecure():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    with pytest.raises(TlsError, match="refusing to serve plaintext on 0.0.0.0:0"):
        add_port(server, "0.0.0.0:0", None)
    assert add_port(server, "0.0.0.0:0", TlsConfig(insecure=True)).startswith("0.0.0.0:")
    assert add_port(server, "127.0.0.1:0", None).startswith("127.0.0.1:")
    assert is_loopback("127.0.0.1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("10.0.0.5")
    server.stop(None)


@pytest.mark.parametrize("command", [
    ["meshserve.runtime", "--model-repository", str(EXAMPLES), "--listen", "0.0.0.0:0"],
    ["meshserve.proxy", "--routes-file", "/dev/null", "--listen", "0.0.0.0:0"],
    ["meshserve.scheduler", "serve", "--listen", "0.0.0.0:0", "--store", "sqlite:///nonexistent/never-opened.db"],
    ["meshserve.node_agent", "--scheduler", "127.0.0.1:1", "--bind-host", "0.0.0.0", "--fake-gpus", "1x1GiB"],
], ids=["meshserve.runtime", "proxy", "scheduler", "node_agent"])
def test_daemon_refuses_plaintext_on_a_wildcard_address(command):
    result = subprocess.run([sys.executable, "-m", *command], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    assert "refusing to serve plaintext on 0.0.0.0:0" in result.stderr
    assert "Traceback" not in result.stderr


def test_settings_that_cannot_work_are_refused_naming_the_setting(pki, other_pki):
    server = pki.issue("node-a", "agent")
    stranger = other_pki.issue("node-a", "agent")
    cases = [
        (TlsConfig(cert=str(server.cert)), "--tls-cert and --tls-key go together"),
        (TlsConfig(require_client_cert=True), "needs --tls-ca"),
        (TlsConfig(cert=str(server.cert), key=str(stranger.key)), "does not match certificate"),
        (TlsConfig(ca="/nonexistent/ca.pem"), "--tls-ca /nonexistent/ca.pem"),
    ]
    for config, message in cases:
        with pytest.raises(TlsError, match=message):
            config.validate()


def test_flags_fall_back_to_the_environment_and_children_get_the_same_settings(pki, tmp_path):
    files = pki.issue("node-a", "agent")
    parser = argparse.ArgumentParser()
    add_tls_arguments(parser)
    environ = {"MESHSERVE_TLS_CERT": str(files.cert), "MESHSERVE_TLS_KEY": str(files.key),
               "MESHSERVE_TLS_CA": pki.ca, "MESHSERVE_TLS_REQUIRE_CLIENT_CERT": "1"}
    from_env = TlsConfig.from_args(parser.parse_args([]), environ)
    assert from_env == TlsConfig(cert=str(files.cert), key=str(files.key), ca=pki.ca, require_client_cert=True)
    assert TlsConfig.from_env(from_env.as_environment()) == from_env
    other = pki.issue("node-b", "agent")
    flags = parser.parse_args(["--tls-cert", str(other.cert), "--tls-key", str(other.key)])
    assert TlsConfig.from_args(flags, environ).cert == str(other.cert)      # the flag wins


def test_client_library_takes_tls_files_or_the_environment(pki, loop, runtimes, monkeypatch):
    runtime = runtimes(pki.tls("node-a", "agent", require_client_cert=True))
    client_files = pki.issue("client-1")
    monkeypatch.setenv("MESHSERVE_TLS_CA", pki.ca)
    monkeypatch.setenv("MESHSERVE_TLS_CERT", str(client_files.cert))
    monkeypatch.setenv("MESHSERVE_TLS_KEY", str(client_files.key))
    with InferenceClient(runtime.address, timeout=CALL_TIMEOUT_S, retries=0) as client:   # from the environment
        assert client.is_server_ready()

    async def call_async() -> bool:
        async with AsyncInferenceClient(runtime.address, tls=pki.tls("client-2"), timeout=CALL_TIMEOUT_S,
                                        retries=0) as client:
            return await client.is_server_ready()
    assert loop.run(call_async())


def test_replicas_get_the_agents_tls_settings_and_a_spec_cannot_change_them(pki):
    from test_node_agent_supervisor import FakeLauncher, fake_supervisor, state_of

    from meshserve.node_agent.replica import ReplicaSpec

    agent_tls = pki.tls("node-a", "agent", require_client_cert=True)

    async def main():
        launcher = FakeLauncher("serve")
        supervisor = fake_supervisor(launcher, tls=agent_tls,
                                     base_env={"PATH": "/usr/bin", "MESHSERVE_TLS_CLIENT_CERT": "/elsewhere.pem"})
        supervisor.apply([ReplicaSpec.create("r1", model_repository="/models", model_name="m", env={
            "MESHSERVE_INSECURE": "1", "MESHSERVE_TLS_CA": "/attacker/ca.pem", "A": "b"})])
        await supervisor.wait_for(state_of("r1", state="ready"), 5)
        await supervisor.drain_all()
        return launcher.commands[0][1]
    env = asyncio.run(main())
    assert TlsConfig.from_env(env) == agent_tls           # exactly the agent's settings, nothing from the spec
    assert "MESHSERVE_INSECURE" not in env and "MESHSERVE_TLS_CLIENT_CERT" not in env and env["A"] == "b"
