"""Where the artifact cache (artifact_cache.py) gets model files from.

Each fetcher puts one model folder's files into an empty folder, or raises
with a one-line reason; the cache then checks the content digest, so a
fetcher never decides what is served. Archives are unpacked by
``common.artifacts.unpack`` (no links, devices, absolute paths or ``..``;
bounded in size and files).

- ``SchedulerFetcher``: a bundle uploaded by ``scheduler ctl apply``, from
  the scheduler's ``ArtifactService.Download`` (the agent's own connection
  settings: TLS, token).
- ``HttpFetcher``: an http(s):// archive (common/artifact_sources.py).
- ``S3Fetcher``: the objects under s3://bucket/prefix, with this host's AWS
  settings (common/artifact_sources.py).
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Callable

import grpc

from meshserve.common.artifact_sources import archive_into, fetch_http, fetch_s3
from meshserve.common.security.tls import TlsConfig, aio_channel
from meshserve.common.security.tokens import aio_token_interceptors
from meshserve.protos.mesh import control_pb2 as pb
from meshserve.protos.mesh import control_pb2_grpc as pb_grpc

from .artifact_cache import ArtifactRef, Fetcher, Progress


class SchedulerFetcher:
    """Bundles from ``ArtifactService.Download`` of the scheduler ``target()`` names (the connected one)."""

    def __init__(self, target: Callable[[], str], tls: TlsConfig | None, token: str | None, max_bytes: int):
        self._target = target
        self._tls = tls
        self._token = token
        self._max_bytes = max_bytes

    async def fetch(self, ref: ArtifactRef, into: pathlib.Path, on_progress: Progress) -> None:
        target = self._target()
        async with aio_channel(target, self._tls, interceptors=aio_token_interceptors(self._token)) as channel:
            call = pb_grpc.ArtifactServiceStub(channel).Download(pb.ArtifactRequest(digest=ref.digest))
            try:
                first = await call.read()
                if first is grpc.aio.EOF:
                    raise ValueError(f"the scheduler at {target} sent nothing")
                total = first.size_bytes

                async def chunks() -> AsyncIterator[bytes]:
                    yield first.data
                    while (chunk := await call.read()) is not grpc.aio.EOF:
                        yield chunk.data

                await archive_into(chunks(), total, into, on_progress, self._max_bytes)
            except grpc.aio.AioRpcError as err:
                raise ValueError(f"scheduler {target}: {err.code().name}: {err.details()}") from None
            finally:
                call.cancel()


class HttpFetcher:
    def __init__(self, max_bytes: int):
        self._max_bytes = max_bytes

    async def fetch(self, ref: ArtifactRef, into: pathlib.Path, on_progress: Progress) -> None:
        await fetch_http(ref.source, into, on_progress, self._max_bytes)


class S3Fetcher:
    def __init__(self, max_bytes: int):
        self._max_bytes = max_bytes

    async def fetch(self, ref: ArtifactRef, into: pathlib.Path, on_progress: Progress) -> None:
        await fetch_s3(ref.source, into, on_progress, self._max_bytes)


def artifact_fetchers(scheduler: Callable[[], str], tls: TlsConfig | None, token: str | None,
                      max_bytes: int) -> dict[str, Fetcher]:
    """The fetchers of a node agent, by source scheme."""
    http = HttpFetcher(max_bytes)
    return {"scheduler": SchedulerFetcher(scheduler, tls, token, max_bytes), "http": http, "https": http,
            "s3": S3Fetcher(max_bytes)}
