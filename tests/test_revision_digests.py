"""Revisions pin their model's digest, and a rollback never lets a later apply reuse a revision number
(the scheduler's brain in process: tests/scheduler_brain.py)."""

from __future__ import annotations

from scheduler_brain import brain, run

from meshserve.protos.mesh import control_pb2 as mesh

DIGESTS = {name: "sha256:" + char * 64 for name, char in (("v1", "1"), ("v2", "2"), ("v3", "3"))}


def spec(version: str, strategy: str = "rolling") -> str:
    return f"""kind: Deployment
name: doubler
model: {{name: doubler, source: "https://models.invalid/doubler.tar", digest: "{DIGESTS[version]}"}}
replicas: 2
resources: {{cpu: 100m}}
rollout: {{strategy: {strategy}, canary_weight: 50, canary_replicas: 1}}
"""


def assigned_digests(b) -> dict[int, set[str]]:
    """revision -> the digests the agents are told to fetch for its replicas."""
    out: dict[int, set[str]] = {}
    for node in ("node-a", "node-b"):
        for assignment in b.core.assignments_for(node).replicas:
            out.setdefault(assignment.revision, set()).add(assignment.artifact_digest)
    return out


def test_a_new_apply_after_a_rollback_is_a_new_revision_with_its_own_bytes(tmp_path):
    async def scenario():
        async with brain(tmp_path) as b:
            for node in ("node-a", "node-b"):
                await b.register(node)
            await b.apply(spec("v1"))
            assert assigned_digests(b) == {1: {DIGESTS["v1"]}}
            await b.apply(spec("v2", "canary"))
            assert assigned_digests(b) == {1: {DIGESTS["v1"]}, 2: {DIGESTS["v2"]}}
            rolled = await b.admin.Rollback(mesh.RolloutRequest(name="doubler"), None)
            assert rolled.revision == 1
            await b.settle()
            assert assigned_digests(b) == {1: {DIGESTS["v1"]}}
            await b.apply(spec("v3"))
            record = b.core.cluster.deployments["doubler"]
            assert record.revision == 3                 # not 2 again: that number meant v2's bytes
            assert [entry.revision for entry in record.history] == [1, 2, 3]
            assert DIGESTS["v2"] not in set().union(*assigned_digests(b).values())
            assert assigned_digests(b).get(3) == {DIGESTS["v3"]}
            deployment = b.admin._deployment("doubler")
            assert deployment.model_digest == DIGESTS["v3"]
            assert list(deployment.revision_digests) == [DIGESTS["v1"], DIGESTS["v2"], DIGESTS["v3"]]
    run(scenario())


def test_a_url_source_without_a_digest_and_an_upload_the_scheduler_lacks_are_refused(tmp_path):
    import pytest

    from meshserve.common.errors import FailedPrecondition, InvalidArgument

    async def scenario():
        async with brain(tmp_path) as b:
            no_digest = spec("v1").replace(f', digest: "{DIGESTS["v1"]}"', "")
            with pytest.raises(InvalidArgument, match="needs model.digest"):
                await b.admin.Apply(mesh.ApplyRequest(spec_yaml=no_digest), None)
            upload = spec("v1").replace('source: "https://models.invalid/doubler.tar"',
                                        "repository: /nowhere, source: upload")
            with pytest.raises(FailedPrecondition, match="holds no bundle"):
                await b.admin.Apply(mesh.ApplyRequest(spec_yaml=upload), None)
            assert "doubler" not in b.core.cluster.deployments
    run(scenario())
