"""The node agent's content-addressed model cache: fetch once, verify, share, evict.

Layout under the cache folder (the agent's own; the host policy's repository
roots do not apply to it)::

    entries/<64 hex>.<model name>/<model name>/...   one verified model: a
                                                     repository of one model
    tmp/                                             fetches in progress

Guarantees:

- ``acquire(ref)`` returns a repository folder whose model folder has exactly
  the content digest ``ref.digest`` (common/artifacts.py): what a fetcher
  produced is digested after it is complete, and only a match is moved into
  ``entries/``, by one atomic rename. A corrupt or truncated download is
  thrown away and fetched again (``attempts`` times, with backoff), and is
  never served; an entry on disk is always a verified one (also after a
  restart of the agent: ``tmp/`` is emptied then).
- Concurrent ``acquire`` calls for one (digest, name) fetch once and share
  the result; every replica of a revision shares the one folder.
- Each ``acquire`` holds the entry until ``release``. The cache keeps its
  entries' total size within ``max_bytes`` by removing the least recently
  used entries that no replica holds; entries in use are never removed (the
  cache may then stay over its bound, and says so in the log).
- Progress reaches ``on_progress(done_bytes, total_bytes or None)``; a fetch
  that fails every attempt raises ``FetchFailed`` with the last reason.
- File work runs in threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import pathlib
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from meshserve.common.artifacts import ArtifactError, check_digest, digest_folder, folder_size
from meshserve.common.backoff import Backoff
from meshserve.common.errors import MeshError
from meshserve.common.model_names import plain_model_name

log = logging.getLogger(__name__)

Progress = Callable[[int, "int | None"], None]
DEFAULT_ATTEMPTS = 3
DEFAULT_RETRY_BACKOFF = Backoff(initial_s=0.5, max_s=4.0, jitter=0.5)


class FetchFailed(Exception):
    """Every attempt to fetch an artifact failed; the message is the last reason (one line)."""


@dataclass(frozen=True)
class ArtifactRef:
    digest: str          # sha256:<hex> of the model folder's content
    source: str          # "scheduler", an http(s):// URL or s3://bucket/prefix
    model_name: str


class Fetcher(Protocol):
    async def fetch(self, ref: ArtifactRef, into: pathlib.Path, on_progress: Progress) -> None:
        """Put the model folder's files into the empty folder ``into``; raise on any failure."""


@dataclass
class _Entry:
    path: pathlib.Path       # the repository folder
    size: int
    users: int = 0
    last_used: float = 0.0


class ArtifactCache:
    def __init__(self, root: str | os.PathLike, max_bytes: int, fetchers: dict[str, Fetcher], *,
                 attempts: int = DEFAULT_ATTEMPTS, backoff: Backoff = DEFAULT_RETRY_BACKOFF):
        self.root = pathlib.Path(root)
        self.max_bytes = max_bytes
        self.fetchers = fetchers     # by scheme: "scheduler", "http", "https", "s3"
        self.attempts = attempts
        self.backoff = backoff
        self.fetches = 0             # completed downloads (a test and benchmark counter)
        self._entries: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Task[_Entry]] = {}
        self._listeners: dict[str, list[Progress]] = {}   # everyone waiting on a fetch hears its progress
        self._loading: asyncio.Future[None] | None = None

    @staticmethod
    def _key(ref: ArtifactRef) -> str:
        return f"{check_digest(ref.digest).split(':', 1)[1]}.{plain_model_name(ref.model_name)}"

    def _load(self) -> None:
        """Adopt the entries left by a previous run (each was verified before its rename); empty tmp/."""
        shutil.rmtree(self.root / "tmp", ignore_errors=True)
        (self.root / "entries").mkdir(parents=True, exist_ok=True)
        for path in (self.root / "entries").iterdir():
            try:
                self._entries[path.name] = _Entry(path, folder_size(path), last_used=path.stat().st_mtime)
            except (OSError, ArtifactError) as err:
                log.warning("artifact cache: dropping unreadable entry %s: %s", path, err)
                shutil.rmtree(path, ignore_errors=True)

    @property
    def used_bytes(self) -> int:
        return sum(entry.size for entry in self._entries.values())

    def holds(self, ref: ArtifactRef) -> bool:
        return self._key(ref) in self._entries

    async def acquire(self, ref: ArtifactRef, on_progress: Progress | None = None) -> pathlib.Path:
        """The repository folder holding ``ref``'s model, fetched and verified if needed; hold it until
        ``release(ref)``. Raises ``FetchFailed`` (or ``MeshError`` for an invalid ref)."""
        key = self._key(ref)
        if self._loading is None:   # once: a second load would empty tmp/ under a fetch in progress
            self._loading = asyncio.ensure_future(asyncio.to_thread(self._load))
        await asyncio.shield(self._loading)
        entry = self._entries.get(key)
        if entry is None:
            task = self._inflight.get(key)
            if task is None:
                task = asyncio.create_task(self._fetch(ref, key), name=f"fetch {key[:12]}")
                self._inflight[key] = task
                task.add_done_callback(functools.partial(self._done, key))
            listeners = self._listeners.setdefault(key, [])
            if on_progress is not None:
                listeners.append(on_progress)
            try:
                # Shielded: one waiter giving up (its replica stopped) does not cancel the others' fetch.
                entry = await asyncio.shield(task)
            finally:
                if on_progress in listeners:
                    listeners.remove(on_progress)
        entry.users += 1
        entry.last_used = time.monotonic()
        return entry.path

    def _done(self, key: str, task: asyncio.Task[_Entry]) -> None:
        if not task.cancelled():
            task.exception()   # seen: every waiter got it, or none was left to
        self._inflight.pop(key, None)
        self._listeners.pop(key, None)

    def _progress(self, key: str, done: int, total: int | None) -> None:
        for listener in list(self._listeners.get(key, ())):
            listener(done, total)

    def release(self, ref: ArtifactRef) -> None:
        entry = self._entries.get(self._key(ref))
        if entry is not None and entry.users > 0:
            entry.users -= 1
            entry.last_used = time.monotonic()

    async def _fetch(self, ref: ArtifactRef, key: str) -> _Entry:
        scheme = "scheduler" if ref.source == "scheduler" else ref.source.split("://", 1)[0]
        fetcher = self.fetchers.get(scheme)
        if fetcher is None:
            raise FetchFailed(f"this agent cannot fetch {scheme!r} sources")
        reason = "no attempt made"
        for attempt in range(1, self.attempts + 1):
            work = self.root / "tmp" / uuid.uuid4().hex
            model_dir = work / ref.model_name
            try:
                await asyncio.to_thread(model_dir.mkdir, parents=True)
                await fetcher.fetch(ref, model_dir, _Throttled(lambda done, total: self._progress(key, done, total)))
                actual = await asyncio.to_thread(digest_folder, model_dir)
                if actual != ref.digest:
                    raise ArtifactError(f"the content digest is {actual}, not {ref.digest}")
                entry = await asyncio.to_thread(self._install, key, work)
                self.fetches += 1
                log.info("artifact %s (%s): fetched and verified, %d bytes", ref.digest, ref.model_name, entry.size)
                await asyncio.to_thread(self._evict)
                return entry
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - any failure is one failed attempt, reported with its reason
                reason = _reason(err)
                log.warning("artifact %s from %s: attempt %d of %d failed: %s", ref.digest, ref.source, attempt,
                            self.attempts, reason)
            finally:
                await asyncio.to_thread(shutil.rmtree, work, True)
            if attempt < self.attempts:
                await asyncio.sleep(self.backoff.delay(attempt))
        raise FetchFailed(reason)

    def _install(self, key: str, work: pathlib.Path) -> _Entry:
        final = self.root / "entries" / key
        os.replace(work, final)
        entry = _Entry(final, folder_size(final), last_used=time.monotonic())
        self._entries[key] = entry
        return entry

    def _evict(self) -> None:
        """Remove least recently used entries nobody holds until the total fits ``max_bytes``."""
        total = self.used_bytes
        for key, entry in sorted(self._entries.items(), key=lambda item: item[1].last_used):
            if total <= self.max_bytes:
                return
            if entry.users:
                continue
            doomed = self.root / "tmp" / f"evicted-{uuid.uuid4().hex}"
            os.replace(entry.path, doomed)     # gone from entries/ at once; deleted below
            del self._entries[key]
            total -= entry.size
            shutil.rmtree(doomed, ignore_errors=True)
            log.info("artifact cache: evicted %s (%d bytes, unused)", key, entry.size)
        if total > self.max_bytes:
            log.warning("artifact cache holds %d bytes, over its bound of %d: every entry is in use", total,
                        self.max_bytes)


class _Throttled:
    """Forward progress at most every PROGRESS_STEP_S, and always the last value."""

    PROGRESS_STEP_S = 0.5

    def __init__(self, target: Progress):
        self._target = target
        self._last = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self._last >= self.PROGRESS_STEP_S or (total is not None and done >= total):
            self._last = now
            self._target(done, total)


def _reason(err: BaseException) -> str:
    message = err.message if isinstance(err, MeshError) else str(err) or type(err).__name__
    return message.splitlines()[0][:300] if message else type(err).__name__
