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
- s3://bucket/prefix: the objects under ``prefix/`` are the model folder's
  files, fetched with boto3 (in a thread): endpoint and credentials come the
  usual AWS ways (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``..._SECRET_...``,
  ``AWS_PROFILE`` and the shared credentials file). boto3 over obstore:
  measured by bench/s3_clients.py on SeaweedFS (boto3 took 0.56x obstore's
  time for a 256 MiB prefix), and it reads the credentials file, which
  obstore does not. A key that would leave the folder (``..``, absolute, empty
  parts) is refused, and so is a prefix over ``max_bytes`` or ``DEFAULT_MAX_FILES``.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator, Callable

import httpx

from .artifacts import DEFAULT_MAX_FILES, unpack

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
    elif scheme == "s3":
        await fetch_s3(source, into, on_progress, max_bytes)
    else:
        raise SourceError(f"no fetcher for {scheme}:// sources")


def split_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix ending in '/') of ``s3://bucket/prefix``; ``SourceError`` for anything else."""
    rest = url[len("s3://"):] if url.startswith("s3://") else ""
    bucket, _, prefix = rest.partition("/")
    if not bucket or not prefix.strip("/"):
        raise SourceError(f"{url!r} is not s3://BUCKET/PREFIX (the prefix holds the model folder's files)")
    return bucket, prefix.strip("/") + "/"


def _relative_key(url: str, key: str, prefix: str) -> str | None:
    """The object's path inside the model folder; None for a folder marker; SourceError if it escapes."""
    relative = key[len(prefix):]
    if not relative or relative.endswith("/"):
        return None
    parts = relative.split("/")
    if relative.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\0" in relative:
        raise SourceError(f"object {key[:200]!r} under {url} would leave the model folder")
    return relative


async def fetch_s3(url: str, into: pathlib.Path, on_progress: Progress, max_bytes: int) -> None:
    """The objects under ``url``'s prefix as the files of ``into``."""
    loop = asyncio.get_running_loop()

    def report(done: int, total: int) -> None:
        loop.call_soon_threadsafe(on_progress, done, total)

    await asyncio.to_thread(_fetch_s3, url, into, report, max_bytes)


def _fetch_s3(url: str, into: pathlib.Path, report: Callable[[int, int], None], max_bytes: int) -> None:
    import boto3  # imported when an s3:// source is used: it takes a while to load
    import botocore.exceptions

    bucket, prefix = split_s3_url(url)
    try:
        client = boto3.session.Session().client("s3")
        objects: list[tuple[str, str, int]] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                relative = _relative_key(url, item["Key"], prefix)
                if relative is not None:
                    objects.append((item["Key"], relative, int(item["Size"])))
                if len(objects) > DEFAULT_MAX_FILES:
                    raise SourceError(f"{url} holds more than {DEFAULT_MAX_FILES} objects")
        if not objects:
            raise SourceError(f"no objects under {url}")
        total = sum(size for _, _, size in objects)
        if total > max_bytes:
            raise SourceError(f"{url} holds {total} bytes, more than the bound of {max_bytes}")
        done = 0
        report(0, total)
        for key, relative, _ in objects:
            target = into / relative
            target.parent.mkdir(parents=True, exist_ok=True)

            def progress(count: int) -> None:
                nonlocal done
                done += count
                report(done, total)
            client.download_file(bucket, key, str(target), Callback=progress)
    except botocore.exceptions.ClientError as err:
        error = err.response.get("Error", {})
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        raise SourceError(f"S3 {status} {error.get('Code', '')} for {url}: {error.get('Message', '')}".strip()) \
            from None
    except botocore.exceptions.BotoCoreError as err:
        raise SourceError(f"{url}: {err}") from None
