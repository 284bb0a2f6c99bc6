"""Endpoint groups on the data plane (runtime and proxy), with real TLS handshakes and tokens on loopback.

Inference, metadata and health are for clients, proxies and agents; model
repository control and shared memory are for admins, unless ``--restrict``
says otherwise. Servers are the real ``RuntimeServer`` and ``ProxyServer``
on 127.0.0.1:0.
"""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mesh_harness import EXAMPLES, REPO_ROOT
from test_proxy_helpers import route
from tls_pki import Pki

from meshserve.clients import InferenceClient
from meshserve.common.errors import PermissionDenied, Unauthenticated
from meshserve.common.security.auth import Authenticator
from meshserve.common.security.roles import data_plane_table, parse_restrict
from meshserve.common.security.tls import sync_channel
from meshserve.common.security.tokens import TokenTable, new_token, token_line, with_token
from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.proxy import ProxyOptions, ProxyServer
from meshserve.proxy.routes import RouteTable
from meshserve.runtime.server import RuntimeServer, ServerOptions

RPC_TIMEOUT_S = 10.0
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("ca"))


async def _start(make):
    server = make()          # grpc.aio servers belong to the loop they are created on
    await server.start()
    return server


@pytest.fixture(scope="module")
def runtime(loop, pki):
    """add_sub over mutual TLS, with the node's certificate, default groups."""
    server = loop.run(_start(lambda: RuntimeServer(ServerOptions(
        repository=str(EXAMPLES), models=["add_sub"], listen="127.0.0.1:0",
        tls=pki.tls("node-a", "agent", require_client_cert=True), auth=Authenticator(certificates=True)))))
    yield server
    loop.run(server.drain())
    loop.run(server.repository.close())


def _code(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def _infer_request() -> pb.ModelInferRequest:
    a = np.arange(16, dtype=np.float32)
    request = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
        request.raw_input_contents.append(a.tobytes())
    return request


CALLS = {
    "inference": lambda stub: stub.ModelInfer(_infer_request(), timeout=RPC_TIMEOUT_S),
    "metadata": lambda stub: stub.ModelMetadata(pb.ModelMetadataRequest(name="add_sub"), timeout=RPC_TIMEOUT_S),
    "statistics": lambda stub: stub.ModelStatistics(pb.ModelStatisticsRequest(name="add_sub"),
                                                    timeout=RPC_TIMEOUT_S),
    "model-repository": lambda stub: stub.RepositoryModelUnload(
        pb.RepositoryModelUnloadRequest(model_name="add_sub"), timeout=RPC_TIMEOUT_S),
    "shared-memory": lambda stub: stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(),
                                                                timeout=RPC_TIMEOUT_S),
}
ALLOWED = {
    "client": {"inference", "metadata", "statistics"},
    "proxy": {"inference", "metadata", "statistics"},
    "agent": {"inference", "metadata"},
    "viewer": set(),
    "admin": set(CALLS),
}


@pytest.mark.parametrize("role", sorted(ALLOWED))
def test_runtime_endpoint_groups_by_role_over_mutual_tls(runtime, pki, role):
    with sync_channel(runtime.address, pki.tls(f"{role}-1", role)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for group, call in CALLS.items():
            code, details = _code(lambda call=call: call(stub))
            if group in ALLOWED[role]:
                assert code != DENIED and code != grpc.StatusCode.UNAUTHENTICATED, (group, code, details)
            else:
                assert code == DENIED, (group, code, details)
                assert "needs role" in details and f"({role})" in details


@pytest.mark.parametrize("role", ["agent", "proxy", "client"])
def test_health_checks_keep_working_for_mesh_roles(runtime, pki, role):
    with sync_channel(runtime.address, pki.tls(f"{role}-h", role)) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_model_control_by_an_admin_reaches_the_runtime_which_decides(runtime, pki):
    """The role lets an admin through; the runtime's own model control (off) still refuses the unload."""
    with sync_channel(runtime.address, pki.tls("root-1", "admin")) as channel:
        code, details = _code(lambda: CALLS["model-repository"](pb_grpc.GRPCInferenceServiceStub(channel)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details


def test_restrict_replaces_a_groups_roles(loop, pki):
    server = loop.run(_start(lambda: RuntimeServer(ServerOptions(
        repository=str(EXAMPLES), models=["add_sub"], listen="127.0.0.1:0",
        tls=pki.tls("node-r", "agent", require_client_cert=True), auth=Authenticator(certificates=True),
        roles=data_plane_table(parse_restrict(["inference=proxy"]))))))
    try:
        with sync_channel(server.address, pki.tls("app-r", "client")) as client, \
                sync_channel(server.address, pki.tls("edge-r", "proxy")) as proxy:
            assert _code(lambda: CALLS["inference"](pb_grpc.GRPCInferenceServiceStub(client)))[0] == DENIED
            assert _code(lambda: CALLS["inference"](pb_grpc.GRPCInferenceServiceStub(proxy)))[0] == \
                grpc.StatusCode.OK
    finally:
        loop.run(server.drain())
        loop.run(server.repository.close())


def test_restrict_values_are_checked():
    with pytest.raises(ValueError, match="GROUP one of"):
        parse_restrict(["everything=client"])
    with pytest.raises(ValueError, match="role 'root'"):
        parse_restrict(["inference=root"])
    assert parse_restrict(["shared-memory="]) == {"shared-memory": frozenset()}


def test_runtime_flags_restrict_and_token_file_reach_the_daemon(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "meshserve.runtime", "--model-repository", str(EXAMPLES), "--listen",
                          "127.0.0.1:0", "--restrict", "inference=nobody"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "role 'nobody'" in bad.stderr


@pytest.fixture(scope="module")
def token_proxy(loop, tmp_path_factory):
    """A proxy with a token file in front of a plaintext runtime; tokens for a client and a viewer."""
    folder = tmp_path_factory.mktemp("proxy-tokens")
    issued = {"client": new_token(), "viewer": new_token(), "admin": new_token()}
    (folder / "tokens").write_text("".join(token_line(t, role, f"{role}-p") + "\n" for role, t in issued.items()))
    runtime = loop.run(_start(lambda: RuntimeServer(ServerOptions(repository=str(EXAMPLES), models=["add_sub"],
                                                          listen="127.0.0.1:0"))))
    table = RouteTable.from_proto(mesh.RouteTable(version=1, routes=[route("add_sub", ("r1", runtime.address))]))
    proxy = loop.run(_start(lambda: ProxyServer(ProxyOptions(
        listen="127.0.0.1:0", routes=table, max_retries=0,
        auth=Authenticator(tokens=TokenTable(str(folder / "tokens")))))))
    yield proxy, issued
    loop.run(proxy.stop(0))
    loop.run(runtime.drain())
    loop.run(runtime.repository.close())


def test_proxy_with_tokens_serves_inference_to_clients_only(token_proxy):
    proxy, issued = token_proxy
    a = np.arange(16, dtype=np.float32)[None, :]
    with InferenceClient(proxy.address, token=issued["client"], timeout=RPC_TIMEOUT_S, retries=0) as client:
        assert client.infer("add_sub", {"INPUT0": a, "INPUT1": a})["OUTPUT0"][0, 1] == 2.0
    with InferenceClient(proxy.address, token=issued["viewer"], timeout=RPC_TIMEOUT_S, retries=0) as viewer, \
            pytest.raises(PermissionDenied, match="needs role"):
        viewer.infer("add_sub", {"INPUT0": a, "INPUT1": a})
    with InferenceClient(proxy.address, timeout=RPC_TIMEOUT_S, retries=0) as anonymous, \
            pytest.raises(Unauthenticated, match="no credentials"):
        anonymous.infer("add_sub", {"INPUT0": a, "INPUT1": a})


@pytest.mark.parametrize("group", ["model-repository", "shared-memory"])
def test_proxy_refuses_model_repository_and_shared_memory_to_clients(token_proxy, group):
    proxy, issued = token_proxy
    with with_token(grpc.insecure_channel(proxy.address), issued["client"]) as channel:
        code, details = _code(lambda: CALLS[group](pb_grpc.GRPCInferenceServiceStub(channel)))
    assert code == DENIED and "needs role admin" in details, details
    with with_token(grpc.insecure_channel(proxy.address), issued["client"]) as channel:
        code, _ = _code(lambda: CALLS["inference"](pb_grpc.GRPCInferenceServiceStub(channel)))
    assert code == grpc.StatusCode.OK


def test_proxy_does_not_pass_a_clients_token_on_to_the_replica(loop, token_proxy):
    """A bearer token is for the proxy alone: the replica behind it never sees it."""
    from meshserve.proxy.tracing import forwarded_metadata

    assert forwarded_metadata([("authorization", "Bearer secret"), ("x-request-id", "1")]) == [("x-request-id", "1")]


def test_async_client_sends_its_token_from_the_environment(loop, token_proxy, monkeypatch):
    from meshserve.clients import AsyncInferenceClient

    proxy, issued = token_proxy
    monkeypatch.setenv("MESHSERVE_TOKEN", issued["client"])
    a = np.arange(16, dtype=np.float32)[None, :]

    async def call():
        async with AsyncInferenceClient(proxy.address, timeout=RPC_TIMEOUT_S, retries=0) as client:
            return (await client.infer("add_sub", {"INPUT0": a, "INPUT1": a}))["OUTPUT0"]
    assert loop.run(call())[0, 1] == 2.0
