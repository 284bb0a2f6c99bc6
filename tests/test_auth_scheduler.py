"""Identities and roles on the scheduler, with real TLS handshakes and tokens on loopback (issue 9).

One in-process ``SchedulerServer`` per module on 127.0.0.1:0 with mutual
TLS (certificates from ``scheduler ctl certs``' functions), and one with a
token file over plaintext loopback; callers are real gRPC channels holding
each role's certificate or token.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import pytest
from mesh_harness import REPO_ROOT, deployment_yaml
from test_proxy_helpers import LoopThread
from tls_pki import Pki

from meshserve.common.security.auth import Authenticator
from meshserve.common.security.tls import TlsConfig, as_flags, sync_channel
from meshserve.common.security.tokens import TokenTable, new_token, parse_token_file, token_line, with_token
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc
from meshserve.scheduler.server import SchedulerOptions, SchedulerServer

RPC_TIMEOUT_S = 10.0
LEADING_TIMEOUT_S = 10.0
ROLES = ("admin", "viewer", "agent", "proxy", "client")
DENIED = grpc.StatusCode.PERMISSION_DENIED


async def _start(options: SchedulerOptions) -> SchedulerServer:
    server = SchedulerServer(options)
    await server.start()
    async with asyncio.timeout(LEADING_TIMEOUT_S):
        while not server.core.leading:  # noqa: ASYNC110 -- the election's first win has no event to await
            await asyncio.sleep(0.05)
    return server


class Scheduler:
    def __init__(self, loop: LoopThread, options: SchedulerOptions):
        self.loop = loop
        self.server = loop.run(_start(options))
        self.address = self.server.address

    def close(self) -> None:
        self.loop.run(self.server.stop())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def mtls_scheduler(loop, pki, tmp_path_factory):
    """Mutual TLS required; audit lines to a file."""
    folder = tmp_path_factory.mktemp("mtls-scheduler")
    tls = pki.tls("scheduler-1", "scheduler", require_client_cert=True)
    scheduler = Scheduler(loop, SchedulerOptions(
        listen="127.0.0.1:0", store_url=f"sqlite:///{folder}/state.db", scheduler_id="s1", election_ttl_s=2,
        tls=tls, auth=Authenticator(certificates=True), audit_log=str(folder / "audit.jsonl")))
    scheduler.audit_path = folder / "audit.jsonl"
    yield scheduler
    scheduler.close()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A token per role, and the token file that accepts them."""
    folder = tmp_path_factory.mktemp("tokens")
    issued = {role: new_token() for role in ROLES}
    issued["node-a"] = new_token()
    lines = [token_line(token, role, f"{role}-person") for role, token in issued.items() if role in ROLES]
    lines.append(token_line(issued["node-a"], "agent", "node-a"))
    path = folder / "tokens"
    path.write_text("# tokens of the test\n" + "\n".join(lines) + "\n")
    return path, issued


@pytest.fixture(scope="module")
def token_scheduler(loop, tokens, tmp_path_factory):
    """Plaintext on loopback with a token file: authentication on, by bearer token."""
    folder = tmp_path_factory.mktemp("token-scheduler")
    scheduler = Scheduler(loop, SchedulerOptions(
        listen="127.0.0.1:0", store_url=f"sqlite:///{folder}/state.db", scheduler_id="s2", election_ttl_s=2,
        auth=Authenticator(tokens=TokenTable(str(tokens[0]))), audit_log=str(folder / "audit.jsonl")))
    yield scheduler
    scheduler.close()


def _status(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


# Each admin RPC with a request, and the roles that may call it (admin may call everything).
ADMIN_CALLS = {
    "Apply": (mesh.ApplyRequest(spec_yaml=deployment_yaml("matrix", replicas=1), dry_run=True), {"admin"}),
    "Delete": (mesh.DeleteRequest(kind="deployment", name="absent"), {"admin"}),
    "Scale": (mesh.ScaleRequest(name="absent", replicas=2), {"admin"}),
    "Promote": (mesh.RolloutRequest(name="absent"), {"admin"}),
    "Rollback": (mesh.RolloutRequest(name="absent"), {"admin"}),
    "Cordon": (mesh.NodeRequest(name="absent"), {"admin"}),
    "Uncordon": (mesh.NodeRequest(name="absent"), {"admin"}),
    "Drain": (mesh.NodeRequest(name="absent"), {"admin"}),
    "DeleteNode": (mesh.DeleteNodeRequest(name="absent"), {"admin"}),
    "Get": (mesh.GetRequest(kind="nodes"), {"admin", "viewer"}),
    "Describe": (mesh.DescribeRequest(kind="deployments", name="absent"), {"admin", "viewer"}),
    "Explain": (mesh.ExplainRequest(kind="deployments", name="absent"), {"admin", "viewer"}),
    "Leader": (mesh.LeaderRequest(), {"admin", "viewer", "agent", "proxy"}),
}


@pytest.mark.parametrize("role", ROLES)
def test_admin_service_role_matrix_over_mutual_tls(mtls_scheduler, pki, role):
    """role x RPC: allowed (the call runs: OK or its own NOT_FOUND), or PERMISSION_DENIED naming the role needed."""
    with sync_channel(mtls_scheduler.address, pki.tls(f"{role}-1", role)) as channel:
        admin = mesh_grpc.AdminServiceStub(channel)
        for method, (request, allowed) in ADMIN_CALLS.items():
            code, details = _status(lambda method=method, request=request: getattr(admin, method)(request,
                                                                                     timeout=RPC_TIMEOUT_S))
            if role in allowed:
                assert code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND), (method, code, details)
            else:
                assert code == DENIED, (method, code, details)
                assert "needs role admin" in details and f"{role}-1 ({role})" in details, details


@pytest.mark.parametrize("role", ROLES)
def test_admin_service_role_matrix_with_tokens(token_scheduler, tokens, role):
    _, issued = tokens
    with with_token(grpc.insecure_channel(token_scheduler.address), issued[role]) as channel:
        admin = mesh_grpc.AdminServiceStub(channel)
        for method, (request, allowed) in ADMIN_CALLS.items():
            code, details = _status(lambda method=method, request=request: getattr(admin, method)(request,
                                                                                     timeout=RPC_TIMEOUT_S))
            expected_allowed = role in allowed
            assert (code != DENIED) == expected_allowed, (method, code, details)


def test_no_credentials_or_an_unknown_token_is_unauthenticated(token_scheduler):
    for token in (None, "not-a-token-anyone-issued"):
        with with_token(grpc.insecure_channel(token_scheduler.address), token) as channel:
            code, details = _status(lambda: mesh_grpc.AdminServiceStub(channel).Get(
                mesh.GetRequest(kind="nodes"), timeout=RPC_TIMEOUT_S))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (token, code, details)
            assert ("unknown bearer token" if token else "no credentials") in details


def test_without_authentication_every_caller_is_allowed_and_changes_are_still_audited(loop, tmp_path):
    """No client certificates required and no token file: development mode, as before; the audit says anonymous."""
    scheduler = Scheduler(loop, SchedulerOptions(listen="127.0.0.1:0", store_url=f"sqlite:///{tmp_path}/state.db",
                                                 scheduler_id="dev", election_ttl_s=2,
                                                 audit_log=str(tmp_path / "audit.jsonl")))
    try:
        with grpc.insecure_channel(scheduler.address) as channel:
            code, _ = _status(lambda: mesh_grpc.AdminServiceStub(channel).Scale(
                mesh.ScaleRequest(name="absent", replicas=1), timeout=RPC_TIMEOUT_S))
            assert code == grpc.StatusCode.NOT_FOUND
    finally:
        scheduler.close()
    [line] = _audit_lines(tmp_path / "audit.jsonl")
    assert (line["who"], line["method"], line["target"], line["outcome"]) == (None, "Scale", "deployment/absent",
                                                                              "NOT_FOUND")


def _first_table_or_status(channel: grpc.Channel) -> tuple[grpc.StatusCode, str]:
    call = mesh_grpc.RouteServiceStub(channel).WatchRoutes(mesh.WatchRoutesRequest(), timeout=RPC_TIMEOUT_S)
    try:
        next(call)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    finally:
        call.cancel()


@pytest.mark.parametrize("role", ROLES)
def test_route_service_is_for_proxies(mtls_scheduler, pki, role):
    with sync_channel(mtls_scheduler.address, pki.tls(f"{role}-r", role)) as channel:
        code, details = _first_table_or_status(channel)
    assert code == (grpc.StatusCode.OK if role in ("proxy", "admin") else DENIED), details
    if code == DENIED:
        assert "needs role admin or proxy" in details


async def _connect(address: str, tls: TlsConfig | None, node: str, token: str | None = None):
    """Open an AgentService stream registering as ``node``: (call, first message or the RpcError)."""
    from meshserve.common.security.tls import aio_channel
    from meshserve.common.security.tokens import aio_token_interceptors

    channel = aio_channel(address, tls, interceptors=aio_token_interceptors(token))
    call = mesh_grpc.AgentServiceStub(channel).Connect()
    try:
        await call.write(mesh.AgentMessage(register=mesh.Register(node_name=node, host="127.0.0.1")))
        first = await call.read()
    except grpc.RpcError:
        first = None
    if first is None or first is grpc.aio.EOF:
        return channel, call, (await call.code(), await call.details())
    return channel, call, first


@pytest.mark.parametrize("role", ROLES)
def test_agent_service_is_for_agents(loop, mtls_scheduler, pki, role):
    async def main():
        channel, call, first = await _connect(mtls_scheduler.address, pki.tls(f"node-{role}", role),
                                              f"node-{role}")
        call.cancel()
        await channel.close()
        return first
    first = loop.run(main())
    if role in ("agent", "admin"):
        assert first.registered.node_name == f"node-{role}"
    else:
        assert first[0] == DENIED and "needs role admin or agent" in first[1], first


def test_an_agent_certificate_cannot_register_as_another_node(loop, mtls_scheduler, pki):
    async def main():
        channel, call, first = await _connect(mtls_scheduler.address, pki.tls("node-x", "agent"), "node-y")
        await channel.close()
        return first
    code, details = loop.run(main())
    assert code == DENIED
    assert "register only as node 'node-x', not 'node-y'" in details
    assert "node-y" not in [n.name for n in mtls_scheduler.server.core.cluster.nodes.values()]


def test_an_agent_token_cannot_register_as_another_node(loop, token_scheduler, tokens):
    _, issued = tokens

    async def main():
        results = []
        for node in ("node-b", ""):         # another node: refused; no name: the identity's
            channel, call, first = await _connect(token_scheduler.address, None, node, issued["node-a"])
            call.cancel()
            await channel.close()
            results.append(first)
        return results
    refused, named = loop.run(main())
    assert refused[0] == DENIED and "'node-a', not 'node-b'" in refused[1]
    assert named.registered.node_name == "node-a"


def test_a_second_connection_for_a_connected_node_is_refused_and_the_first_keeps_its_stream(
        loop, mtls_scheduler, pki):
    tls = pki.tls("node-twice", "agent")

    async def main():
        first_channel, first_call, first = await _connect(mtls_scheduler.address, tls, "node-twice")
        assert first.registered.node_name == "node-twice"
        await first_call.read()                                  # its assignments
        second_channel, second_call, second = await _connect(mtls_scheduler.address, tls, "node-twice")
        await second_channel.close()
        # The first stream is still the node's: a report on it is taken, and the stream stays open.
        await first_call.write(mesh.AgentMessage(report=mesh.UsageReport(sequence=1)))
        still_open = not first_call.done()
        # After the first stream really ends, the node may connect again (a reconnect).
        first_call.cancel()
        await first_channel.close()
        async with asyncio.timeout(RPC_TIMEOUT_S):
            while "node-twice" in mtls_scheduler.server.core._node_channels:  # noqa: ASYNC110 -- no event
                await asyncio.sleep(0.02)
        third_channel, third_call, third = await _connect(mtls_scheduler.address, tls, "node-twice")
        third_call.cancel()
        await third_channel.close()
        return second, still_open, third
    second, still_open, third = loop.run(main())
    assert second[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert "node node-twice is already connected" in second[1]
    assert still_open
    assert third.registered.node_name == "node-twice"


def _audit_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mutating_admin_calls_are_audited_allowed_or_refused(mtls_scheduler, pki):
    with sync_channel(mtls_scheduler.address, pki.tls("alice", "admin")) as admin_channel, \
            sync_channel(mtls_scheduler.address, pki.tls("bob", "viewer")) as viewer_channel:
        admin = mesh_grpc.AdminServiceStub(admin_channel)
        viewer = mesh_grpc.AdminServiceStub(viewer_channel)
        admin.Apply(mesh.ApplyRequest(spec_yaml=deployment_yaml("audited", replicas=1)), timeout=RPC_TIMEOUT_S)
        admin.Scale(mesh.ScaleRequest(name="audited", replicas=2), timeout=RPC_TIMEOUT_S)
        assert _status(lambda: viewer.Delete(mesh.DeleteRequest(kind="deployment", name="audited"),
                                             timeout=RPC_TIMEOUT_S))[0] == DENIED
        assert _status(lambda: admin.Cordon(mesh.NodeRequest(name="nowhere"), timeout=RPC_TIMEOUT_S))[0] == \
            grpc.StatusCode.NOT_FOUND
        viewer.Get(mesh.GetRequest(kind="deployments"), timeout=RPC_TIMEOUT_S)     # a read: not audited
    lines = [line for line in _audit_lines(mtls_scheduler.audit_path)
             if line["who"] in ("admin/alice", "viewer/bob")]
    assert [(line["who"], line["method"], line["target"], line["outcome"]) for line in lines] == [
        ("admin/alice", "Apply", "deployment/audited", "OK"),
        ("admin/alice", "Scale", "deployment/audited", "OK"),
        ("viewer/bob", "Delete", "deployment/audited", "PERMISSION_DENIED"),
        ("admin/alice", "Cordon", "node/nowhere", "NOT_FOUND"),
    ]
    assert "needs role admin" in lines[2]["detail"]
    assert all(line["time"].endswith("+00:00") for line in lines)


def _ctl(address: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "meshserve.scheduler", "ctl", "--server", address, *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in {**os.environ, **(env or {})}.items()
                               if not k.startswith("MESHSERVE_") or k in (env or {})})


def test_ctl_with_a_token_created_by_ctl_tokens_create(loop, tmp_path):
    created = subprocess.run([sys.executable, "-m", "meshserve.scheduler", "ctl", "tokens", "create", "--role", "viewer",
                              "--name", "bob"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    token, line = created.stdout.splitlines()
    [(_, who)] = parse_token_file(line)
    assert (who.role, who.name) == ("viewer", "bob") and token not in line     # only its digest is stored
    (tmp_path / "tokens").write_text(line + "\n")
    (tmp_path / "bob.token").write_text(token + "\n")
    scheduler = Scheduler(loop, SchedulerOptions(
        listen="127.0.0.1:0", store_url=f"sqlite:///{tmp_path}/state.db", scheduler_id="ctl", election_ttl_s=2,
        auth=Authenticator(tokens=TokenTable(str(tmp_path / "tokens")))))
    try:
        by_file = _ctl(scheduler.address, "--token-file", str(tmp_path / "bob.token"), "-o", "json", "get", "nodes")
        assert by_file.returncode == 0, by_file.stderr
        by_env = _ctl(scheduler.address, "scale", "some-deployment", "--replicas", "3", env={"MESHSERVE_TOKEN": token})
        assert by_env.returncode == 1 and "PERMISSION_DENIED" in by_env.stderr and "needs role admin" in \
            by_env.stderr, by_env.stderr
        anonymous = _ctl(scheduler.address, "get", "nodes")
        assert anonymous.returncode != 0 and "UNAUTHENTICATED" in anonymous.stderr, anonymous.stderr
        assert "Traceback" not in by_env.stderr + anonymous.stderr
    finally:
        scheduler.close()


def test_scheduler_serve_takes_token_file_and_audit_log_flags(tmp_path, pki):
    """The flags reach the daemon: a bad token file stops it at once naming the line."""
    (tmp_path / "tokens").write_text("sha256:1234 admin alice\n")
    result = subprocess.run([sys.executable, "-m", "meshserve.scheduler", "serve", "--listen", "127.0.0.1:0", "--store",
                             f"sqlite:///{tmp_path}/state.db", "--token-file", str(tmp_path / "tokens"),
                             "--audit-log", str(tmp_path / "audit.jsonl")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "line 1" in result.stderr and "64 hex digits" in result.stderr


def test_ctl_with_a_certificate_is_refused_naming_the_role(mtls_scheduler, pki):
    viewer = _ctl(mtls_scheduler.address, *as_flags(pki.tls("carol", "viewer")), "cordon", "node-q")
    assert viewer.returncode == 1 and "PERMISSION_DENIED" in viewer.stderr and "needs role admin" in viewer.stderr


def test_node_agent_and_proxy_present_their_tokens(loop, token_scheduler, tokens, tmp_path):
    """node-agent --token-file registers as its node; a proxy with a client token follows the routes."""
    import time

    from mesh_harness import Process

    from meshserve.proxy import ProxyOptions, ProxyServer

    _, issued = tokens
    (tmp_path / "node.token").write_text(issued["node-a"] + "\n")
    agent = Process("agent", ["-m", "meshserve.node_agent", "--scheduler", token_scheduler.address, "--name", "node-a",
                              "--fake-gpus", "1x24GiB", "--state-dir", str(tmp_path / "state"),
                              "--token-file", str(tmp_path / "node.token")], env={"MESHSERVE_TOKEN": ""})
    try:
        deadline = time.monotonic() + 30
        core = token_scheduler.server.core
        while not (core.cluster.live.get("node-a") and core.cluster.live["node-a"].connected):
            assert time.monotonic() < deadline and agent.proc.poll() is None, "".join(agent.output[-20:])
            time.sleep(0.1)     # another process's state: nothing to await across processes
    finally:
        agent.stop()

    async def follow(token):
        proxy = ProxyServer(ProxyOptions(schedulers=[token_scheduler.address], listen="127.0.0.1:0",
                                         client_token=token))
        await proxy.start()
        try:
            await proxy.wait_for_routes(timeout=3)
            return True
        except TimeoutError:
            return False
        finally:
            await proxy.stop(0)
    assert loop.run(follow(issued["proxy"]))
    assert not loop.run(follow(issued["client"]))       # a client's token may not watch routes
