"""A deployment's env (secrets) never travels to an agent over an unauthenticated channel from another host."""

from __future__ import annotations

from mesh_harness import deployment_yaml
from scheduler_brain import _gpus, _resources, brain, run

from meshserve.common.assignment_env import GPU_MEMORY_ENV
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.scheduler.agent_channel import carries_secrets

SPEC_WITH_A_SECRET = deployment_yaml("adder", replicas=2) + "env:\n  HF_TOKEN: hf_secret\n"


class FakeContext:
    def __init__(self, peer: str, auth: dict | None = None):
        self._peer, self._auth = peer, auth or {}

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict:
        return self._auth


def test_only_mutual_tls_or_loopback_streams_carry_secrets():
    assert carries_secrets(FakeContext("ipv4:127.0.0.1:5000"))
    assert carries_secrets(FakeContext("ipv6:%5B::1%5D:5000"))
    assert not carries_secrets(FakeContext("ipv4:10.0.0.7:5000"))
    assert not carries_secrets(FakeContext("ipv4:10.0.0.7:5000", {"transport_security_type": [b"ssl"]}))
    assert carries_secrets(FakeContext("ipv4:10.0.0.7:5000", {"transport_security_type": [b"ssl"],
                                                              "x509_pem_cert": [b"-----BEGIN CERTIFICATE-----"]}))


def test_an_agent_without_an_authenticated_channel_gets_no_env(tmp_path):
    async def main():
        async with brain(tmp_path) as b:
            await b.core.register(mesh.Register(node_name="remote", host="10.0.0.7", gpu_source="fake",
                                                gpus=_gpus("remote"), resources=_resources()),
                                  carries_secrets=False)
            await b.register("local")
            await b.apply(SPEC_WITH_A_SECRET)
            remote, local = b.core.assignments_for("remote"), b.core.assignments_for("local")
            assert remote.replicas and local.replicas
            assert "HF_TOKEN" not in remote.replicas[0].env
            assert GPU_MEMORY_ENV in remote.replicas[0].env          # what the mesh sets is no secret
            assert local.replicas[0].env["HF_TOKEN"] == "hf_secret"
    run(main())
