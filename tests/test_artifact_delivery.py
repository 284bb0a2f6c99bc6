"""Model artifacts end to end: `scheduler ctl apply` uploads a folder only it has; agents fetch,
verify and cache it; a changed model is a new revision; rollback serves the old bytes again.

Real processes on loopback: a scheduler with its blob folder, two node agents whose host policy
allows none of the ctl's folders (they can only serve what they fetched), a proxy, and ctl as an
operator runs it.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
from mesh_harness import REPO_ROOT, Admin

from meshserve.clients import InferenceClient
from meshserve.common.artifacts import digest_folder, short
from meshserve.protos.mesh import control_pb2 as mesh

CONFIG = """name: "doubler"
backend: "python"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
MODEL_PY = """import numpy as np


class Predictor:
    def __init__(self, config):
        pass

    def predict(self, inputs):
        return {{"Y": (inputs["X"] * {factor}).astype(np.float32)}}
"""
CALLS = 215


def write_model(repository, factor: int) -> None:
    folder = repository / "doubler"
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(CONFIG)
    (folder / "1" / "model.py").write_text(MODEL_PY.format(factor=factor))


def spec_yaml(strategy: str = "rolling") -> str:
    return f"""kind: Deployment
name: doubler
model: {{repository: ./models, name: doubler, source: upload}}
replicas: 2
resources: {{cpu: 100m}}
rollout: {{strategy: {strategy}, canary_weight: 50, canary_replicas: 1}}
"""


def ctl(address: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "meshserve.scheduler", "ctl", "--server", address,
                           "--timeout", "60", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def factors(proxy_address: str, calls: int) -> list[float]:
    """What each of ``calls`` calls through the proxy multiplied its input by."""
    x = np.arange(1, 5, dtype=np.float32)
    answers = []
    with InferenceClient(proxy_address, timeout=30) as client:
        for _ in range(calls):
            y = client.infer("doubler", {"X": x})["Y"]
            answers.append(float(y[0]))
    return answers


def settled(admin: Admin, revision: int):
    replicas = admin.replicas("doubler")
    return (len(replicas) == 2 and all(r.state == "ready" and r.revision == revision for r in replicas)
            and replicas)


def test_an_uploaded_model_is_served_on_hosts_that_never_had_it_and_rollback_serves_the_old_bytes(
        cluster, tmp_path):
    operator = tmp_path / "operator"          # exists only on the ctl side
    write_model(operator / "models", 2)
    (operator / "doubler.yaml").write_text(spec_yaml())
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    for name in ("node-a", "node-b"):
        cluster.agent(name, scheduler.address)
    proxy = cluster.proxy(scheduler.address)
    admin = Admin(scheduler.address)
    admin.wait_for(lambda: len(admin.nodes()) == 2, "2 nodes", mesh_=cluster)

    assert ctl(scheduler.address, "apply", "-f", str(operator / "doubler.yaml")) == "deployment/doubler created\n"
    first = admin.wait_for(lambda: settled(admin, 1), "2 ready replicas of revision 1", mesh_=cluster)
    assert {r.node for r in first} == {"node-a", "node-b"}
    assert set(factors(proxy.address, 20)) == {2.0}
    digest_1 = digest_folder(operator / "models" / "doubler")
    assert ctl(scheduler.address, "apply", "-f", str(operator / "doubler.yaml")) == "deployment/doubler unchanged\n"

    # The same spec with a changed model.py is a new revision: here a canary taking half the calls.
    write_model(operator / "models", 3)
    (operator / "doubler.yaml").write_text(spec_yaml("canary"))
    assert ctl(scheduler.address, "apply", "-f", str(operator / "doubler.yaml")) == \
        "deployment/doubler configured\n"
    admin.wait_for(lambda: sum(r.state == "ready" for r in admin.replicas("doubler")) == 3, "the canary ready",
                   mesh_=cluster)
    assert admin.wait_for(lambda: {2.0, 3.0} <= set(factors(proxy.address, 40)), "both revisions answering")
    deployment = admin.stub.Get(mesh.GetRequest(kind="deployments"), timeout=10).deployments[0]
    digest_2 = digest_folder(operator / "models" / "doubler")
    assert deployment.model_digest == digest_2 != digest_1
    assert list(deployment.revision_digests) == [digest_1, digest_2]
    described = ctl(scheduler.address, "describe", "deployment", "doubler")
    assert short(digest_1) in described and short(digest_2) in described

    # Both bundles are in the scheduler's --artifact-dir, one file per digest, and nothing else is.
    blobs = pathlib.Path(cluster._files.name) / "artifacts" / "sha256"
    assert sorted(p.name for p in blobs.iterdir()) == sorted(d.split(":")[1] + ".tar" for d in (digest_1, digest_2))

    out = ctl(scheduler.address, "rollback", "doubler")
    assert "rolled back from revision 2 to revision 1" in out
    admin.wait_for(lambda: settled(admin, 1), "only revision 1 again", mesh_=cluster)
    admin.wait_for(lambda: set(factors(proxy.address, 5)) == {2.0}, "the proxy routing revision 1 only")
    answers = factors(proxy.address, CALLS)
    assert answers == [2.0] * CALLS, f"{answers.count(3.0)} of {CALLS} calls got the rolled-back model"

    # A changed model.py, rolling this time: a new revision replaces both replicas.
    write_model(operator / "models", 5)
    (operator / "doubler.yaml").write_text(spec_yaml())
    assert ctl(scheduler.address, "apply", "-f", str(operator / "doubler.yaml")) == \
        "deployment/doubler configured\n"
    admin.wait_for(lambda: settled(admin, 3), "2 ready replicas of revision 3", mesh_=cluster)
    admin.wait_for(lambda: set(factors(proxy.address, 5)) == {5.0}, "the proxy routing revision 3 only")
    assert factors(proxy.address, 50) == [5.0] * 50
    admin.close()


def test_an_http_archive_is_pinned_at_apply_and_a_corrupt_download_is_never_served(cluster, tmp_path):
    from archive_server import ArchiveServer, bundle_of

    write_model(tmp_path / "v2", 2)
    write_model(tmp_path / "v3", 3)
    good, other = bundle_of(tmp_path / "v2" / "doubler"), bundle_of(tmp_path / "v3" / "doubler")
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    cluster.agent("node-a", scheduler.address)
    proxy = cluster.proxy(scheduler.address)
    admin = Admin(scheduler.address)
    admin.wait_for(lambda: len(admin.nodes()) == 1, "1 node", mesh_=cluster)
    with ArchiveServer() as server:
        server.files["/doubler.tar"] = good
        spec = tmp_path / "doubler.yaml"
        spec.write_text(spec_yaml().replace("{repository: ./models, name: doubler, source: upload}",
                                            f"{{name: doubler, source: '{server.url('/doubler.tar')}'}}")
                        .replace("replicas: 2", "replicas: 1"))
        # The first GET (ctl's, pinning the digest) gets the model; the next nine (three rounds of the
        # agent's attempts) get other bytes under the same URL, which must never run; then the right ones.
        server.plan["/doubler.tar"] = ["ok"] + [other] * 9
        assert ctl(scheduler.address, "apply", "-f", str(spec)) == "deployment/doubler created\n"

        def refused():
            replicas = admin.replicas("doubler")
            return replicas and replicas[0].state == "failed" and "fetch failed" in replicas[0].reason and replicas
        [replica] = admin.wait_for(refused, "the replica to report the failed fetch", mesh_=cluster)
        assert "content digest is sha256:" in replica.reason and replica.address == ""
        admin.wait_for(lambda: settled_one(admin), "the replica ready on the pinned bytes", mesh_=cluster)
        assert set(factors(proxy.address, 10)) == {2.0}
        assert server.gets["/doubler.tar"] == 1 + 9 + 1
    admin.close()


def settled_one(admin: Admin):
    replicas = admin.replicas("doubler")
    return len(replicas) == 1 and replicas[0].state == "ready"
