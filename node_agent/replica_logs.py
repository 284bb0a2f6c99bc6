"""Each replica's stdout and stderr, kept in a rotated file per replica in the agent's state directory.

``ReplicaLogs(directory)`` owns ``DIRECTORY/REPLICA.log`` (and its rotated
``REPLICA.log.1`` ... ``.N``). ``writer(replica_id)`` appends lines as the
process prints them; ``tail`` and ``follow`` read them back for
``scheduler ctl logs``.

Guarantees:
- A replica id is a file name only if it is a safe one (letters, digits,
  ``.``, ``_``, ``-``; not starting with a dot; at most 200 characters);
  any other id (it comes from the scheduler, so it may be hostile) is
  refused with ``ValueError``: no path escapes the directory.
- A file never grows past ``max_bytes`` plus one line; at most ``backups``
  older files are kept (the standard library's ``RotatingFileHandler``).
- ``prune`` removes the files of replicas not running here once untouched
  for ``retention_s`` (7 days): ids change with every rollout, and the
  directory must not grow without bound.
- Writes are ordinary buffered appends to the page cache, flushed per line:
  microseconds, so they run on the event loop (as the agent's own logging
  does); reads for ``tail`` and ``follow`` run in a thread.
- ``tail`` returns at most ``lines`` lines and ``max_bytes`` bytes (the
  newest ones); ``follow`` yields new lines until ``done()``, in order,
  across a rotation (the rest of the old file first), as long as the file
  does not rotate twice between two looks (``FOLLOW_POLL_S`` apart).
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 3
# The files of a replica this agent no longer runs are removed once untouched this long.
DEFAULT_RETENTION_S = 7 * 24 * 3600
# How often ``follow`` looks for new output: a file has no readiness to wait on (inotify is Linux-only).
FOLLOW_POLL_S = 0.2

log = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")
_LOG_FILE = re.compile(r"^(.+)\.log(\.\d+)?$")     # REPLICA.log, REPLICA.log.1, ...


class _QuietRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A failed write (a full disk) is logged once as a warning, not a traceback per line on stderr."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            log.warning("cannot write %s: %r; lines that cannot be written are lost (said once)",
                        self.baseFilename, sys.exc_info()[1])


class ReplicaLogWriter:
    """Appends one replica's output lines to its rotated file; ``close()`` when the replica is gone."""

    def __init__(self, path: Path, max_bytes: int, backups: int):
        self._handler = _QuietRotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                  encoding="utf-8", delay=True)
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, line: str) -> None:
        record = logging.LogRecord("replica", logging.INFO, "", 0, line, None, None)
        self._handler.handle(record)

    def close(self) -> None:
        self._handler.close()


class ReplicaLogs:
    def __init__(self, directory: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 backups: int = DEFAULT_BACKUPS):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.backups = backups

    def path(self, replica_id: str) -> Path:
        if not _SAFE_ID.match(replica_id):
            raise ValueError(f"replica id {replica_id[:80]!r} cannot name a log file")
        return self.directory / f"{replica_id}.log"

    def writer(self, replica_id: str) -> ReplicaLogWriter:
        path = self.path(replica_id)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        return ReplicaLogWriter(path, self.max_bytes, self.backups)

    async def prune(self, running: set[str], retention_s: float = DEFAULT_RETENTION_S) -> list[str]:
        """Remove the files of replicas not in ``running`` untouched for ``retention_s``; the names removed."""
        return await asyncio.to_thread(self._prune, running, retention_s)

    def _prune(self, running: set[str], retention_s: float) -> list[str]:
        removed = []
        cutoff = time.time() - retention_s
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        for entry in entries:
            match = _LOG_FILE.match(entry.name)
            if match is None or match.group(1) in running or not entry.is_file(follow_symlinks=False):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed.append(entry.name)
            except FileNotFoundError:
                pass
        return removed

    def exists(self, replica_id: str) -> bool:
        return self.path(replica_id).exists()

    async def tail(self, replica_id: str, lines: int, max_bytes: int) -> tuple[list[str], int]:
        """The newest ``lines`` lines within ``max_bytes`` bytes, and the offset in the current file after them."""
        return await asyncio.to_thread(self._tail, self.path(replica_id), lines, max_bytes)

    def _tail(self, path: Path, lines: int, max_bytes: int) -> tuple[list[str], int]:
        chunks: list[bytes] = []
        budget = max_bytes
        end = 0
        for index, candidate in enumerate([path, *(Path(f"{path}.{n}") for n in range(1, self.backups + 1))]):
            try:
                with open(candidate, "rb") as handle:
                    size = handle.seek(0, os.SEEK_END)
                    if index == 0:
                        end = size
                    start = max(0, size - budget)
                    handle.seek(start)
                    data = handle.read(size - start)
            except FileNotFoundError:
                continue
            chunks.insert(0, data)
            budget -= len(data)
            if budget <= 0 or data.count(b"\n") > lines:
                break
        text = b"".join(chunks)
        if len(text) >= max_bytes:   # cut at a byte budget: the first line may be partial, drop it
            text = text.split(b"\n", 1)[1] if b"\n" in text else b""
        found = text.decode("utf-8", "replace").splitlines()
        return (found[-lines:] if lines > 0 else []), end

    async def follow(self, replica_id: str, offset: int, done: Callable[[], bool]) -> AsyncIterator[list[str]]:
        """New lines written after ``offset`` of the current file, in batches, until ``done()`` is true."""
        path = self.path(replica_id)
        inode = None
        position = offset
        partial = b""
        while not done():
            data, inode, position, rotated = await asyncio.to_thread(self._read_new, path, inode, position)
            if data:
                data = partial + data
                *complete, partial = data.split(b"\n")
                if len(partial) > self.max_bytes:    # a runaway line with no newline: give it as it is
                    complete.append(partial)
                    partial = b""
                if complete:
                    yield [line.decode("utf-8", "replace") for line in complete]
                continue
            if not rotated:
                await asyncio.sleep(FOLLOW_POLL_S)

    @staticmethod
    def _read_new(path: Path, inode: int | None, position: int) -> tuple[bytes, int | None, int, bool]:
        """Up to 64 KiB after ``position``. After a rotation (the file has another inode, or is shorter) the
        rest of the old file (now ``.1``, the same inode) comes first, then the new file from its start."""
        try:
            with open(path, "rb") as handle:
                stat = os.fstat(handle.fileno())
                rotated = (inode is not None and stat.st_ino != inode) or stat.st_size < position
                if not rotated:
                    handle.seek(position)
                    data = handle.read(64 * 1024)
                    return data, stat.st_ino, position + len(data), False
        except FileNotFoundError:
            return b"", inode, position, False
        rest = b""
        try:
            with open(f"{path}.1", "rb") as old:
                if os.fstat(old.fileno()).st_ino == inode:
                    old.seek(position)
                    rest = old.read()
        except FileNotFoundError:
            pass
        return rest, None, 0, True
