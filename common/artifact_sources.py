"""Fetching a model folder from a URL source: http(s):// archives and s3:// prefixes.

Used by ``scheduler ctl apply`` (to take the digest of a URL source once, at
apply) and by the node agent's cache (node_agent/artifact_fetchers.py). Each
``fetch_*`` puts the model folder's files into an empty folder or raises
``SourceError`` with a one-line reason (``HTTP 403 Forbidden from URL``);
it never decides what is served: callers compare the content digest.

- http(s)://...: a tar (or gzip'd tar) of the model folder, fetched with
  httpx (a maintained async client: streaming, timeouts, redirects) and
  unpacked by ``common.artifacts.unpack`` (no links, devices, absolute paths
  or ``..``; bounded in size and files). A body longer than ``max_bytes``
  is cut off while it streams; one shorter than its Content-Length is a
  truncated download.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator, Callable

import httpx

from .artifacts import unpack

Progress = Callable[[int, "int | None"], None]
# Connecting and each read; a stalled server fails the attempt instead of hanging it.
HTTP_TIMEOUT_S = 30.0


class SourceError(Exception):
    """A source could not be fetched; the message is one line naming the source and the reason."""


async def archive_into(chunks: AsyncIterator[bytes], total: int | None, into: pathlib.Path,
                       on_progress: Progress, max_bytes: int) -> None:
    """Write an archive's bytes beside ``into``, then unpack it into ``into``; checks the length when known."""
    archive = into.parent / f".{into.name}.archive"
    handle = await asyncio.to_thread(open, archive, "wb")
    done = 0
    try:
        try:
            on_progress(0, total)
            async for data in chunks:
                done += len(data)
                if done > max_bytes:
                    raise SourceError(f"the archive is larger than the bound of {max_bytes} bytes")
                await asyncio.to_thread(handle.write, data)
                on_progress(done, total)
        finally:
            await asyncio.to_thread(handle.close)
        if total is not None and done != total:
            raise SourceError(f"truncated download: {done} of {total} bytes")
        await asyncio.to_thread(unpack, archive, into, max_bytes=max_bytes)
    finally:
        await asyncio.to_thread(archive.unlink, True)


async def fetch_http(url: str, into: pathlib.Path, on_progress: Progress, max_bytes: int) -> None:
    """The archive at ``url`` unpacked into ``into``."""
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, follow_redirects=True) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise SourceError(f"HTTP {response.status_code} {response.reason_phrase} from {url}")
                length = response.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                if total is not None and total > max_bytes:
                    raise SourceError(f"{url} is {total} bytes, more than the bound of {max_bytes}")
                await archive_into(response.aiter_raw(), total, into, on_progress, max_bytes)
    except httpx.HTTPError as err:
        raise SourceError(f"{url}: {type(err).__name__}: {err}") from None


async def fetch_source(source: str, into: pathlib.Path, on_progress: Progress, max_bytes: int) -> None:
    """Any URL source into ``into``, by its scheme."""
    scheme = source.split("://", 1)[0]
    if scheme in ("http", "https"):
        await fetch_http(source, into, on_progress, max_bytes)
    else:
        raise SourceError(f"no fetcher for {scheme}:// sources")
