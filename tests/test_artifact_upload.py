"""``ArtifactService`` (scheduler/artifact_service.py) on a real gRPC server on loopback: hostile uploads
get the right status and a message naming the problem, and nothing is kept; a good one round-trips."""

from __future__ import annotations

import asyncio
import io
import tarfile

import grpc
import pytest
from archive_server import bundle_of, make_model

from meshserve.common.artifacts import digest_folder
from meshserve.common.limits import CONTROL_PLANE
from meshserve.common.status_interceptor import StatusInterceptor
from meshserve.protos.mesh import control_pb2 as pb
from meshserve.protos.mesh import control_pb2_grpc as pb_grpc
from meshserve.scheduler.artifact_service import ArtifactService
from meshserve.scheduler.artifacts import BlobStore

LIMIT = 200_000
CHUNK = 64 * 1024


def run_against_service(tmp_path, scenario):
    """Run ``scenario(stub, blobs)`` against a real server holding a BlobStore bounded at LIMIT bytes."""
    blobs = BlobStore(tmp_path / "blobs", max_bytes=LIMIT)

    async def main():
        server = grpc.aio.server(interceptors=[StatusInterceptor()], options=CONTROL_PLANE.server_options())
        pb_grpc.add_ArtifactServiceServicer_to_server(ArtifactService(blobs), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await scenario(pb_grpc.ArtifactServiceStub(channel), blobs)
        finally:
            await server.stop(None)
    return asyncio.run(main())


def chunks(digest: str, data: bytes, declared: int | None = None):
    declared = len(data) if declared is None else declared
    pieces = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
    yield pb.ArtifactChunk(digest=digest, size_bytes=declared, data=pieces[0])
    for piece in pieces[1:]:
        yield pb.ArtifactChunk(data=piece)


async def refused(stub, requests) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Upload(requests, timeout=10)
    return failure.value.code(), failure.value.details()


def leftovers(blobs: BlobStore) -> list:
    return [p for p in blobs.root.rglob("*") if p.is_file()]


def test_a_good_upload_is_kept_under_its_digest_and_downloads_byte_for_byte(tmp_path):
    folder = make_model(tmp_path / "m", weights=100_000)
    digest, data = digest_folder(folder), bundle_of(folder)

    async def scenario(stub, blobs):
        assert not (await stub.Stat(pb.ArtifactRequest(digest=digest), timeout=10)).present
        info = await stub.Upload(chunks(digest, data), timeout=10)
        assert info.present and info.size_bytes == len(data)
        assert (await stub.Stat(pb.ArtifactRequest(digest=digest), timeout=10)).present
        got = b"".join([c.data async for c in stub.Download(pb.ArtifactRequest(digest=digest), timeout=10)])
        assert got == data
        assert leftovers(blobs) == [blobs.path(digest)]
    run_against_service(tmp_path, scenario)


def test_a_bundle_whose_content_is_not_its_digest_is_refused(tmp_path):
    folder = make_model(tmp_path / "m")
    claimed = digest_folder(make_model(tmp_path / "other", factor=3))

    async def scenario(stub, blobs):
        code, details = await refused(stub, chunks(claimed, bundle_of(folder)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"its content digest is {digest_folder(folder)}, not {claimed}" in details
        assert leftovers(blobs) == []
        code, _ = await refused(stub, chunks("sha256:nothex", bundle_of(folder)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    run_against_service(tmp_path, scenario)


def test_too_large_truncated_and_overlong_uploads_are_refused(tmp_path):
    folder = make_model(tmp_path / "m", weights=10_000)
    digest, data = digest_folder(folder), bundle_of(folder)

    async def scenario(stub, blobs):
        code, details = await refused(stub, chunks(digest, data, declared=LIMIT + 1))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 200000" in details
        code, details = await refused(stub, chunks(digest, data[:-700], declared=len(data)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "truncated" in details
        code, details = await refused(stub, chunks(digest, data + b"\0" * 10, declared=len(data)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "longer than" in details
        assert leftovers(blobs) == []
    run_against_service(tmp_path, scenario)


def test_a_bundle_that_escapes_its_folder_is_refused_and_writes_nothing_outside(tmp_path):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 4
        archive.addfile(info, io.BytesIO(b"evil"))
    digest = "sha256:" + "0" * 64

    async def scenario(stub, blobs):
        code, details = await refused(stub, chunks(digest, out.getvalue()))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "leaves the folder" in details
        assert leftovers(blobs) == []
    run_against_service(tmp_path, scenario)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_downloading_an_unknown_digest_is_not_found(tmp_path):
    async def scenario(stub, blobs):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for _ in stub.Download(pb.ArtifactRequest(digest="sha256:" + "1" * 64), timeout=10):
                pass
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    run_against_service(tmp_path, scenario)
