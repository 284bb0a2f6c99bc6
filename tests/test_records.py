"""Stored deployment records: typed in memory, the same JSON in the store as every earlier version wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from scheduler_brain import brain, run

from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.scheduler.records import DeploymentRecord, RevisionEntry
from meshserve.scheduler.spec import DeploymentSpec, SpecError, parse_deployments
from meshserve.scheduler.store import Put

EXAMPLES = sorted(Path(REPO_ROOT, "examples").rglob("*.yaml"))
V1 = """kind: Deployment
name: adder
model: {repository: /models, name: add_sub}
replicas: 2
resources: {gpus: 1, gpu_memory: 1.5GiB, cpu: 500m, memory: 2GiB}
placement: {strategy: pack, node_selector: {gpu: h100}}
runtime_args: [--drain-delay, "2"]
env: {OMP_NUM_THREADS: "4"}
"""
V2 = V1.replace("cpu: 500m", "cpu: 2") + "rollout: {strategy: canary, canary_weight: 30, canary_replicas: 2}\n"
PIPELINE = """kind: Pipeline
name: pipe
model: {repository: /models, name: pipe}
colocate: preferred
steps:
  - {model: pre, resources: {cpu: 250m}}
  - {model: net, resources: {gpus: 1, gpu_memory: 4GiB}}
"""


def old_json(name: str, specs: list[tuple[int, DeploymentSpec]], *, revision: int, replicas: int,
             stable: int, with_spec_in_history: bool = True) -> bytes:
    """A record exactly as the previous version wrote it (dataclasses.asdict of a dict-holding record)."""
    current = specs[-1][1]
    history = [{"revision": n, "spec_yaml": spec.to_yaml(), **({"spec": spec.to_dict()} if with_spec_in_history
                                                                 else {})} for n, spec in specs]
    return json.dumps({"name": name, "spec": current.to_dict(), "spec_yaml": current.to_yaml(),
                       "fingerprint": current.fingerprint(), "revision_fingerprint": current.revision_fingerprint(),
                       "revision": revision, "replicas": replicas, "created_unix_ms": 1234, "history": history,
                       "stable_revision": stable}, sort_keys=True).encode()


@pytest.mark.parametrize("text", [V1, V2, PIPELINE] + [path.read_text() for path in EXAMPLES],
                         ids=["v1", "v2", "pipeline"] + [path.name for path in EXAMPLES])
def test_every_spec_round_trips_through_its_stored_dict(text):
    for spec in parse_deployments(text):
        assert DeploymentSpec.from_dict(spec.to_dict()) == spec
        assert DeploymentSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_a_record_in_the_old_shape_loads_typed_and_writes_back_byte_for_byte():
    [v1], [v2] = parse_deployments(V1), parse_deployments(V2)
    stored = old_json("adder", [(1, v1), (2, v2)], revision=2, replicas=2, stable=1)
    record = DeploymentRecord.from_json(stored)
    assert record.spec == v2 and record.spec_of(1) == v1 and record.history == (RevisionEntry(1, v1),
                                                                                RevisionEntry(2, v2))
    assert record.canary_active and record.canary_weight == 30 and record.spec.rollout.canary_replicas == 2
    assert record.to_json() == stored
    assert DeploymentRecord.from_json(record.to_json()) == record


def test_history_entries_written_before_they_carried_the_spec_are_read_from_their_yaml():
    [v1], [v2] = parse_deployments(V1), parse_deployments(V2)
    record = DeploymentRecord.from_json(old_json("adder", [(1, v1), (2, v2)], revision=2, replicas=2, stable=2,
                                                 with_spec_in_history=False))
    assert record.spec_of(1) == v1 and record.spec_of(2) == v2
    assert record.to_json() == old_json("adder", [(1, v1), (2, v2)], revision=2, replicas=2, stable=2)


@pytest.mark.parametrize("mangle, problem", [
    (lambda raw: raw["spec"]["resources"].update(cpu="lots"), "spec.resources.cpu"),
    (lambda raw: raw["spec"].update(surprise=1), "spec.surprise: unknown field"),
    (lambda raw: raw["spec"].pop("model"), "spec.model: required"),
    (lambda raw: raw.update(spec=[1, 2]), "expected a mapping"),
    (lambda raw: raw.update(history={"revision": 1}), "history: expected a list"),
    (lambda raw: raw["history"][0].update(revision="1"), "history[0]: not a revision entry"),
    (lambda raw: raw["history"][0]["spec"].update(replicas=-1), "history[0].spec.replicas"),
    (lambda raw: raw.update(revision=True), "revision: True is not a whole number"),
    (lambda raw: raw.pop("name"), "not a deployment record"),
    (lambda raw: raw["history"][0].pop("spec"), "history[0].spec_yaml: holds 2 deployments"),
    (lambda raw: (raw["history"][0].pop("spec"), raw["history"][0].update(spec_yaml="{")), "not valid YAML"),
])
def test_a_mangled_stored_record_is_refused_naming_the_field(mangle, problem):
    [v1] = parse_deployments(V1)
    raw = json.loads(old_json("adder", [(1, v1)], revision=1, replicas=2, stable=1))
    raw["history"][0]["spec_yaml"] = V1 + "---\n" + V1.replace("adder", "other")   # read only without "spec"
    mangle(raw)
    with pytest.raises(SpecError) as caught:
        DeploymentRecord.from_json(json.dumps(raw).encode())
    assert problem in str(caught.value)


def test_a_store_written_by_the_previous_version_serves_get_and_rollback_unchanged(tmp_path):
    [v1], [v2] = parse_deployments(V1), parse_deployments(V2)
    stored = old_json("adder", [(1, v1), (2, v2)], revision=2, replicas=2, stable=1)

    async def test():
        async with brain(tmp_path) as b:
            await b.store.txn([], [Put("/meshserve/deployments/adder", stored)])
            await b.core.cluster.load(b.store)
            [got] = b.admin._get("deployments", "adder").deployments
            assert got.spec_yaml == v2.to_yaml() and got.model == "add_sub" and got.created_unix_ms == 1234
            assert list(got.revision_history) == [1, 2] and got.stable_revision == 1 and got.canary_weight == 30
            reply = await b.admin.Rollback(mesh.RolloutRequest(name="adder"), None)   # the canary: back to 1
            assert reply.revision == 1
            record = b.core.cluster.deployments["adder"]
            assert record.spec == v1 and not record.canary_active
            items, _ = await b.store.range("/meshserve/deployments/")
            assert DeploymentRecord.from_json(items[0].value) == record
    run(test())
