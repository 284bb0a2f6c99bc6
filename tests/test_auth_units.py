"""Units of identities and roles: the role table, token files, one stream per node (fake clock)."""

from __future__ import annotations

import asyncio
import os

import pytest
from scheduler_brain import HEARTBEAT_TIMEOUT_S, brain

from meshserve.common.errors import FailedPrecondition
from meshserve.common.security.roles import (
    CONTROL_PLANE,
    GROUPS,
    MUTATING_ADMIN_METHODS,
    control_plane_table,
    data_plane_table,
)
from meshserve.common.security.tokens import (
    TokenError,
    TokenTable,
    bearer_token,
    client_token,
    digest,
    new_token,
    parse_token_file,
    token_line,
)
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.scheduler.audit import target_of


def _methods(pb2_module, service: str) -> set[str]:
    """Every RPC of ``service`` as the full method name servers see (``/package.Service/Method``)."""
    described = pb2_module.DESCRIPTOR.services_by_name[service]
    return {f"/{described.full_name}/{method.name}" for method in described.methods}


def test_every_rpc_of_every_service_has_a_row():
    """A new RPC must be placed in the table (else it is admin-only by default): the table names them all."""
    from meshserve.protos.inference import grpc_service_pb2
    from meshserve.protos.mesh import control_pb2

    control = set().union(*(_methods(control_pb2, s) for s in ("AdminService", "AgentService", "RouteService",
                                                                      "ArtifactService")))
    assert control == set(CONTROL_PLANE)
    data = {method for methods in GROUPS.values() for method in methods if "inference." in method}
    assert data == _methods(grpc_service_pb2, "GRPCInferenceService")


def test_admin_may_do_everything_and_an_unknown_method_is_admin_only():
    for table in (control_plane_table(), data_plane_table()):
        assert table.allows("admin", "/anything/Else")
        assert not table.allows("viewer", "/anything/Else")
        assert table.roles_for("/anything/Else") == {"admin"}
    assert all(control_plane_table().roles_for(m) == {"admin"} for m in MUTATING_ADMIN_METHODS)


def test_token_lines_round_trip_and_only_digests_are_stored():
    token = new_token()
    line = token_line(token, "viewer", "bob")
    assert token not in line and line.startswith(digest(token))
    [(stored, who)] = parse_token_file(line)
    assert (who.role, who.name) == ("viewer", "bob") and len(stored) == 32


@pytest.mark.parametrize("text, problem", [
    ("sha256:abc viewer bob", "64 hex digits"),
    ("md5:" + "0" * 64 + " viewer bob", "expected 'sha256"),
    (f"sha256:{'0' * 64} root bob", "role 'root'"),
    (f"sha256:{'0' * 64} viewer ../bob", "name '../bob'"),
    (f"sha256:{'0' * 64} viewer bob\nsha256:{'0' * 64} admin alice", "line 2: this digest is already listed"),
])
def test_a_bad_token_file_is_refused_naming_the_line(text, problem):
    with pytest.raises(TokenError, match=problem.replace("(", r"\(")):
        parse_token_file(text, "tokens")


def test_token_table_identifies_and_picks_up_a_changed_file(tmp_path):
    now = [0.0]
    path = tmp_path / "tokens"
    alice, bob = new_token(), new_token()
    path.write_text(token_line(alice, "admin", "alice") + "\n")
    table = TokenTable(str(path), clock=lambda: now[0])
    assert str(table.identify(alice)) == "alice (admin)"
    assert table.identify(bob) is None and table.identify("") is None and table.identify("x" * 10_000) is None
    path.write_text(token_line(bob, "viewer", "bob") + "\n")           # alice revoked, bob added
    os.utime(path, ns=(1, 1))
    now[0] += 2.0
    assert table.identify(alice) is None and str(table.identify(bob)) == "bob (viewer)"
    path.write_text("garbage\n")                                      # a broken edit keeps the last good tokens
    now[0] += 2.0
    assert str(table.identify(bob)) == "bob (viewer)"


def test_bearer_metadata_and_client_token_sources(tmp_path):
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) == ""
    assert bearer_token([("x", "y")]) is None
    (tmp_path / "t").write_text("secret\n")
    assert client_token(str(tmp_path / "t"), environ={}) == "secret"
    assert client_token(None, environ={"MESHSERVE_TOKEN": "from-env"}) == "from-env"
    assert client_token(None, environ={}) is None
    (tmp_path / "empty").write_text("")
    with pytest.raises(TokenError, match="is empty"):
        client_token(str(tmp_path / "empty"))


def test_audit_targets_name_what_changes():
    assert target_of("/mesh.AdminService/Scale", mesh.ScaleRequest(name="web")) == "deployment/web"
    assert target_of("/mesh.AdminService/Drain", mesh.NodeRequest(name="gpu-7")) == "node/gpu-7"
    spec = "kind: Deployment\nname: a\n---\nkind: Deployment\nname: b\n"
    assert target_of("/mesh.AdminService/Apply", mesh.ApplyRequest(spec_yaml=spec)) == "deployment/a,deployment/b"
    assert target_of("/mesh.AdminService/Apply", mesh.ApplyRequest(spec_yaml="{")) == "spec (unparsable)"


def test_a_second_stream_is_refused_until_the_first_is_gone_or_silent(tmp_path):
    """One stream per node: refused while the first reports, accepted once it is silent past the timeout."""
    async def main():
        async with brain(tmp_path) as b:
            await b.register("node-a")
            with pytest.raises(FailedPrecondition, match="node node-a is already connected"):
                await b.register("node-a")
            b.clock.now += HEARTBEAT_TIMEOUT_S / 2
            await b.report("node-a")                                  # still reporting: still refused
            b.clock.now += HEARTBEAT_TIMEOUT_S / 2
            with pytest.raises(FailedPrecondition):
                await b.register("node-a")
            old = b.core._node_channels["node-a"]
            b.clock.now += HEARTBEAT_TIMEOUT_S + 0.1                  # silent past the timeout: half-open
            await b.register("node-a")
            sent = [old.get_nowait() for _ in range(old.qsize())]
            assert sent[-1] is None                                   # the old stream is told to end
            assert b.core._node_channels["node-a"] is not old
            new = b.core._node_channels["node-a"]
            b.core.disconnect("node-a", new)                          # closed: a reconnect is welcome at once
            await b.register("node-a")
    asyncio.run(main())


def test_replicas_never_inherit_the_agents_token():
    """A replica runs model code: the agent's bearer token (or token file) must not reach its environment."""
    from test_node_agent_supervisor import FakeLauncher, fake_supervisor, state_of

    from meshserve.node_agent.replica import ReplicaSpec

    async def main():
        launcher = FakeLauncher("serve")
        supervisor = fake_supervisor(launcher, base_env={"PATH": "/usr/bin", "MESHSERVE_TOKEN": "agent-secret",
                                                         "MESHSERVE_TOKEN_FILE": "/etc/meshserve/tokens"})
        supervisor.apply([ReplicaSpec.create("r1", model_repository="/models", model_name="m",
                                             env={"MESHSERVE_TOKEN": "from-spec", "A": "b"})])
        await supervisor.wait_for(state_of("r1", state="ready"), 5)
        await supervisor.drain_all()
        return launcher.commands[0][1]
    env = asyncio.run(main())
    assert "MESHSERVE_TOKEN" not in env and "MESHSERVE_TOKEN_FILE" not in env and env["A"] == "b"


def test_agents_may_download_model_bundles_and_only_admins_upload_them():
    table = control_plane_table()
    assert table.allows("agent", "/mesh.ArtifactService/Download")
    for role in ("agent", "viewer", "proxy"):
        assert not table.allows(role, "/mesh.ArtifactService/Upload")
        assert not table.allows(role, "/mesh.ArtifactService/Stat")
    assert table.allows("admin", "/mesh.ArtifactService/Upload")
