"""Where the artifact cache (artifact_cache.py) gets model files from.

Each fetcher puts one model folder's files into an empty folder, or raises
with a one-line reason; the cache then checks the content digest, so a
fetcher never decides what is served. Archives are unpacked by
``common.artifacts.unpack`` (no links, devices, absolute paths or ``..``;
bounded in size and files).

- ``SchedulerFetcher``: a bundle uploaded by ``scheduler ctl apply``, from
  the scheduler's ``ArtifactService.Download`` (the agent's own connection
  settings: TLS, token).
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator, Callable

import grpc

from meshserve.common.artifacts import unpack
from meshserve.common.security.tls import TlsConfig, aio_channel
from meshserve.common.security.tokens import aio_token_interceptors
from meshserve.protos.mesh import control_pb2 as pb
from meshserve.protos.mesh import control_pb2_grpc as pb_grpc

from .artifact_cache import ArtifactRef, Fetcher, Progress


async def archive_into(chunks: AsyncIterator[bytes], total: int | None, into: pathlib.Path,
                       on_progress: Progress, max_bytes: int) -> None:
    """Write an archive's bytes beside ``into``, then unpack it there; checks the length when known."""
    archive = into.parent / ".archive"
    handle = await asyncio.to_thread(open, archive, "wb")
    done = 0
    try:
        on_progress(0, total)
        async for data in chunks:
            done += len(data)
            if done > max_bytes:
                raise ValueError(f"the archive is larger than this cache's bound of {max_bytes} bytes")
            await asyncio.to_thread(handle.write, data)
            on_progress(done, total)
    finally:
        await asyncio.to_thread(handle.close)
    if total is not None and done != total:
        raise ValueError(f"truncated download: {done} of {total} bytes")
    try:
        await asyncio.to_thread(unpack, archive, into, max_bytes=max_bytes)
    finally:
        await asyncio.to_thread(archive.unlink, True)


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


def artifact_fetchers(scheduler: Callable[[], str], tls: TlsConfig | None, token: str | None,
                      max_bytes: int) -> dict[str, Fetcher]:
    """The fetchers of a node agent, by source scheme."""
    return {"scheduler": SchedulerFetcher(scheduler, tls, token, max_bytes)}
