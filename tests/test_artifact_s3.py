"""s3:// model sources against a real S3-compatible server (SeaweedFS, tests/seaweedfs_server.py):
the fetcher, hostile keys and refused credentials, and a deployment served end to end."""

from __future__ import annotations

import asyncio

import pytest
from mesh_harness import Admin
from seaweedfs_server import SeaweedS3
from test_artifact_delivery import ctl, factors, settled_one, spec_yaml, write_model

from meshserve.common.artifact_sources import SourceError, _relative_key, fetch_s3, split_s3_url
from meshserve.common.artifacts import digest_folder
from meshserve.protos.mesh import control_pb2 as mesh


@pytest.fixture(scope="module")
def s3():
    server = SeaweedS3().start()
    import boto3

    client = server.client(boto3)
    client.create_bucket(Bucket="models")
    yield server, client
    server.stop()


def upload_folder(client, folder, prefix: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(Bucket="models", Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())


def test_the_objects_under_a_prefix_are_the_model_folder(s3, tmp_path, monkeypatch):
    server, client = s3
    write_model(tmp_path / "src", 2)
    upload_folder(client, tmp_path / "src" / "doubler", "fetcher/doubler")
    for name, value in server.environment().items():
        monkeypatch.setenv(name, value)
    into = tmp_path / "into"
    into.mkdir()
    seen = []
    asyncio.run(fetch_s3("s3://models/fetcher/doubler", into, lambda d, t: seen.append((d, t)), 1 << 30))
    assert digest_folder(into) == digest_folder(tmp_path / "src" / "doubler")
    assert seen[-1][0] == seen[-1][1] > 0


def test_refused_credentials_and_an_empty_prefix_are_the_reason(s3, tmp_path, monkeypatch):
    server, client = s3
    client.put_object(Bucket="models", Key="denied/model/config.pbtxt", Body=b"x")
    for name, value in server.environment().items():
        monkeypatch.setenv(name, value)
    into = tmp_path / "into"
    into.mkdir()
    with pytest.raises(SourceError, match="no objects under"):
        asyncio.run(fetch_s3("s3://models/nothing/here", into, lambda d, t: None, 1 << 30))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(SourceError, match="S3 403"):
        asyncio.run(fetch_s3("s3://models/denied/model", into, lambda d, t: None, 1 << 30))


@pytest.mark.parametrize("key", ["m/../../escaped.txt", "m/a/../../../x", "m//etc/passwd", "m/./x"])
def test_a_key_that_would_leave_the_model_folder_is_refused(key):
    # SeaweedFS refuses such keys itself; other S3 servers store them, so the fetcher checks every key.
    with pytest.raises(SourceError, match="would leave the model folder"):
        _relative_key("s3://b/m", key, "m/")
    assert _relative_key("s3://b/m", "m/1/model.py", "m/") == "1/model.py"
    assert _relative_key("s3://b/m", "m/1/", "m/") is None
    with pytest.raises(SourceError, match="not s3://BUCKET/PREFIX"):
        split_s3_url("s3://bucket-only")


def test_an_s3_model_is_pinned_at_apply_and_served(s3, cluster, tmp_path, monkeypatch):
    server, client = s3
    write_model(tmp_path / "src", 2)
    upload_folder(client, tmp_path / "src" / "doubler", "mesh/doubler")
    for name, value in server.environment().items():   # the agent and ctl read the usual AWS variables
        monkeypatch.setenv(name, value)
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
    cluster.agent("node-a", scheduler.address)
    proxy = cluster.proxy(scheduler.address)
    admin = Admin(scheduler.address)
    admin.wait_for(lambda: len(admin.nodes()) == 1, "1 node", mesh_=cluster)
    spec = tmp_path / "doubler.yaml"
    spec.write_text(spec_yaml().replace("{repository: ./models, name: doubler, source: upload}",
                                        "{name: doubler, source: 's3://models/mesh/doubler'}")
                    .replace("replicas: 2", "replicas: 1"))
    assert ctl(scheduler.address, "apply", "-f", str(spec)) == "deployment/doubler created\n"
    admin.wait_for(lambda: settled_one(admin), "the replica ready on the S3 model", mesh_=cluster)
    assert set(factors(proxy.address, 10)) == {2.0}
    deployment = admin.stub.Get(mesh.GetRequest(kind="deployments"), timeout=10).deployments[0]
    assert deployment.model_digest == digest_folder(tmp_path / "src" / "doubler")
    admin.close()
