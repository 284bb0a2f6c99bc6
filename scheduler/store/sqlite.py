"""The embedded store backend: one SQLite file with etcd's semantics (see ``base.py``).

Guarantees and limits:

- All database work runs on ONE dedicated worker thread (a single-thread
  executor); the event loop never blocks on SQLite, and the statements of one
  call never interleave with another's. Every write is one SQLite
  transaction (WAL journal, ``synchronous=FULL``), so a ``txn`` is atomic and
  a committed write survives a crash or a close/reopen.
- Revisions, keys (with create/mod revision, version, lease), leases and the
  event history all live in the file: a reopened store carries on from the
  same revision, and a watch can resume across a restart.
- Watchers are woken in-process by the writer: a watch follows the writes of
  the ``SqliteStore`` object it was opened on, so **watchers must live in the
  same process as the writer**. That holds for the scheduler, the only writer
  and the only watcher of the store. Two processes must not open one file.
- Leases expire on wall-clock time (``time.time()``), the only clock that
  means something across a restart; a background task in the loop deletes
  an expired lease's keys (one revision per lease, with delete events).
- History is kept until ``compact``; on top of that the store compacts
  itself to the last ``history_revisions`` revisions (like etcd's
  ``--auto-compaction-mode=revision``), so a watcher that falls further
  behind than that gets ``Compacted`` and relists.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import os
import sqlite3
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import TypeVar

from .base import (
    Compacted,
    Compare,
    CorruptStore,
    Delete,
    KeyValue,
    LeaseExpired,
    Put,
    StoreError,
    TxnResult,
    WatchEvent,
    prefix_end,
)

T = TypeVar("T")

# A reconciler more than this many writes behind relists rather than replays;
# 100k events is tens of MB of history at most.
HISTORY_REVISIONS = 100_000
# Auto-compaction runs when the history exceeds the bound by this much, so its
# DELETE is amortised over many writes instead of running on every one.
COMPACT_SLACK = 1_000
# The expiry task sleeps until the next lease deadline, but at most this long,
# so a wall-clock step (NTP) delays an expiry by no more than this.
EXPIRY_MAX_SLEEP_S = 1.0
# A watch replays history in pages of this many revisions (whole revisions, bounded memory).
WATCH_PAGE = 1_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY, value BLOB NOT NULL, create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL, version INTEGER NOT NULL, lease INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS history (
    revision INTEGER NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, key BLOB NOT NULL,
    value BLOB NOT NULL, create_revision INTEGER NOT NULL, version INTEGER NOT NULL,
    lease INTEGER NOT NULL, PRIMARY KEY (revision, seq));
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY, ttl INTEGER NOT NULL, expires_at REAL NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 1), ('compact_revision', 0), ('next_lease', 1);
"""


def _key(key: str) -> bytes:
    return key.encode()



def _kv(row) -> KeyValue:
    key, value, create_revision, mod_revision, version, lease = row
    return KeyValue(bytes(key).decode(), bytes(value), create_revision, mod_revision, version, lease)


def _check_ops(ops) -> None:
    """etcd refuses a transaction branch that writes one key twice; so do we."""
    puts = [op.key for op in ops if isinstance(op, Put)]
    if len(puts) != len(set(puts)):
        raise ValueError(f"a transaction may write a key only once: {sorted(puts)}")
    for op in ops:
        if isinstance(op, Delete):
            for key in puts:
                if key == op.key or (op.prefix and key.startswith(op.key)):
                    raise ValueError(f"a transaction may not put and delete {key!r}")


class SqliteStore:
    """The embedded backend; create it with ``await SqliteStore.open(path)``."""

    def __init__(self, path: str, history_revisions: int = HISTORY_REVISIONS):
        self.path = path
        self.history_revisions = history_revisions
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._db: sqlite3.Connection | None = None
        self._changed = asyncio.Event()     # replaced after every write; watchers wait on the current one
        self._loop: asyncio.AbstractEventLoop | None = None
        self._revision_moved = False        # worker thread: the open transaction bumped the revision
        self._lease_granted = asyncio.Event()
        self._closed = False
        self._expiry_task: asyncio.Task | None = None

    @classmethod
    async def open(cls, path: str, history_revisions: int = HISTORY_REVISIONS) -> SqliteStore:
        store = cls(path, history_revisions)
        store._loop = asyncio.get_running_loop()
        try:
            await store._run(store._connect)
        except StoreError as exc:
            store._executor.shutdown(wait=False)
            cause = exc.__cause__
            if isinstance(exc, CorruptStore) or (isinstance(cause, sqlite3.DatabaseError)
                                                 and not isinstance(cause, sqlite3.OperationalError)):
                raise CorruptStore(f"{exc}; refusing to run on it: restore the file from a backup "
                                   f"or move it away") from cause
            raise
        except BaseException:
            store._executor.shutdown(wait=False)
            raise
        store._expiry_task = asyncio.get_running_loop().create_task(store._expire_leases(),
                                                                    name=f"sqlite-store lease expiry {path}")
        return store

    # -- plumbing -------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args) -> T:
        if self._closed:
            raise StoreError(f"store {self.path} is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc

    def _connect(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)   # explicit BEGIN/COMMIT below
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")                     # a committed write survives power loss
        db.execute("PRAGMA busy_timeout=5000")
        try:
            db.executescript(_SCHEMA)
            _check_integrity(db, self.path)
        except BaseException:
            db.close()
            raise
        self._db = db

    @property
    def _conn(self) -> sqlite3.Connection:
        """The open connection (worker thread only); a closed store has none."""
        if self._db is None:
            raise StoreError(f"store {self.path} is closed")
        return self._db

    def _meta(self, name: str) -> int:
        return self._conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0]

    def _set_meta(self, name: str, value: int) -> None:
        self._conn.execute("UPDATE meta SET value = ? WHERE name = ?", (value, name))
        if name == "revision":
            self._revision_moved = True

    def _in_txn(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in one SQLite transaction; after a commit that wrote events, wake the watchers.

        The wake-up is sent from here, right after COMMIT, and not by the coroutine
        that asked for the write: that one may have been cancelled meanwhile.
        """
        db = self._conn
        self._revision_moved = False
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn()
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        if self._revision_moved and self._loop is not None:   # set by open(), before any write
            self._loop.call_soon_threadsafe(self._notify)
        return result

    def _notify(self) -> None:
        """Wake every watcher (called in the loop after a write committed)."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- writes (worker thread, inside a transaction) ---------------------------------------------

    def _apply(self, ops: list[Put | Delete], now: float) -> int:
        """Apply ops as one revision; returns the number of keys deleted. No change: no new revision."""
        db = self._conn
        revision = self._meta("revision") + 1
        seq = itertools.count()
        deleted = 0
        for op in ops:
            if isinstance(op, Put):
                key = _key(op.key)
                if op.lease:
                    row = db.execute("SELECT expires_at FROM leases WHERE id = ?", (op.lease,)).fetchone()
                    if row is None or row[0] <= now:
                        raise LeaseExpired(f"lease {op.lease} is gone (put {op.key!r})")
                old = db.execute("SELECT create_revision, version FROM kv WHERE key = ?", (key,)).fetchone()
                create_revision, version = (old[0], old[1] + 1) if old else (revision, 1)
                db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?, ?)",
                           (key, op.value, create_revision, revision, version, op.lease))
                db.execute("INSERT INTO history VALUES (?, ?, 'put', ?, ?, ?, ?, ?)",
                           (revision, next(seq), key, op.value, create_revision, version, op.lease))
            else:
                deleted += self._delete_keys(self._select_keys(op.key, op.prefix), revision, seq)
        if next(seq) > 0:
            self._set_meta("revision", revision)
            self._auto_compact(revision)
        return deleted

    def _select_keys(self, key: str, prefix: bool) -> list[bytes]:
        start = _key(key)
        if not prefix:
            rows = self._conn.execute("SELECT key FROM kv WHERE key = ?", (start,))
        elif (end := prefix_end(start)) is None:
            rows = self._conn.execute("SELECT key FROM kv WHERE key >= ? ORDER BY key", (start,))
        else:
            rows = self._conn.execute("SELECT key FROM kv WHERE key >= ? AND key < ? ORDER BY key", (start, end))
        return [bytes(row[0]) for row in rows]

    def _delete_keys(self, keys: list[bytes], revision: int, seq) -> int:
        for key in keys:
            self._conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            self._conn.execute("INSERT INTO history VALUES (?, ?, 'delete', ?, x'', 0, 0, 0)", (revision, next(seq), key))
        return len(keys)

    def _auto_compact(self, revision: int) -> None:
        oldest = revision - self.history_revisions
        if oldest - self._meta("compact_revision") >= COMPACT_SLACK:
            self._compact(oldest)

    def _compact(self, revision: int) -> None:
        self._conn.execute("DELETE FROM history WHERE revision < ?", (revision,))
        self._set_meta("compact_revision", revision)

    def _revoke(self, lease: int) -> int:
        """Delete a lease and its keys in one revision; returns how many keys went."""
        self._conn.execute("DELETE FROM leases WHERE id = ?", (lease,))
        keys = [bytes(row[0]) for row in self._conn.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease,))]
        if keys:
            revision = self._meta("revision") + 1
            self._delete_keys(keys, revision, itertools.count())
            self._set_meta("revision", revision)
            self._auto_compact(revision)
        return len(keys)

    # -- the Store protocol ------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        def read():
            row = self._conn.execute("SELECT key, value, create_revision, mod_revision, version, lease "
                                   "FROM kv WHERE key = ?", (_key(key),)).fetchone()
            return _kv(row) if row else None
        return await self._run(read)

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        def read():
            start, columns = _key(prefix), "key, value, create_revision, mod_revision, version, lease"
            end = prefix_end(start)
            if end is None:
                rows = self._conn.execute(f"SELECT {columns} FROM kv WHERE key >= ? ORDER BY key", (start,))
            else:
                rows = self._conn.execute(f"SELECT {columns} FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                                        (start, end))
            return [_kv(row) for row in rows], self._meta("revision")
        return await self._run(read)

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        def write():
            self._apply([Put(key, bytes(value), lease)], time.time())
            return self._meta("revision")
        return await self._run(self._in_txn, write)

    async def delete(self, key: str, prefix: bool = False) -> int:
        return await self._run(self._in_txn, lambda: self._apply([Delete(key, prefix)], time.time()))

    async def txn(self, compares: list[Compare], success: list[Put | Delete],
                  failure: Sequence[Put | Delete] = ()) -> TxnResult:
        success, failure = list(success), list(failure)
        _check_ops(success)
        _check_ops(failure)

        def run() -> TxnResult:
            observed: list[KeyValue | None] = []
            holds = True
            for compare in compares:
                row = self._conn.execute("SELECT key, value, create_revision, mod_revision, version, lease "
                                       "FROM kv WHERE key = ?", (_key(compare.key),)).fetchone()
                kv = _kv(row) if row else None
                observed.append(kv)
                holds = holds and _compare_holds(compare, kv)
            self._apply(success if holds else failure, time.time())
            return TxnResult(holds, self._meta("revision"), observed)
        return await self._run(self._in_txn, run)

    async def grant_lease(self, ttl_s: int) -> int:
        ttl = max(1, int(ttl_s))

        def grant():
            lease = self._meta("next_lease")
            self._set_meta("next_lease", lease + 1)
            self._conn.execute("INSERT INTO leases VALUES (?, ?, ?)", (lease, ttl, time.time() + ttl))
            return lease
        lease = await self._run(self._in_txn, grant)
        self._lease_granted.set()      # the expiry task may be sleeping past this lease's deadline
        return lease

    async def keep_alive(self, lease: int) -> int:
        def refresh():
            now = time.time()
            row = self._conn.execute("SELECT ttl, expires_at FROM leases WHERE id = ?", (lease,)).fetchone()
            if row is None:
                return None
            if row[1] <= now:                       # expired, not reaped yet: reap it now
                self._revoke(lease)
                return None
            self._conn.execute("UPDATE leases SET expires_at = ? WHERE id = ?", (now + row[0], lease))
            return row[0]
        ttl = await self._run(self._in_txn, refresh)
        if ttl is None:
            raise LeaseExpired(f"lease {lease} is gone")
        return ttl

    async def revoke_lease(self, lease: int) -> None:
        await self._run(self._in_txn, lambda: self._revoke(lease))

    async def compact(self, revision: int) -> None:
        def compact():
            if revision > self._meta("revision"):
                raise ValueError(f"cannot compact to revision {revision}: the store is at {self._meta('revision')}")
            if revision > self._meta("compact_revision"):
                self._compact(revision)
        await self._run(self._in_txn, compact)

    def watch(self, prefix: str, start_revision: int) -> AsyncGenerator[WatchEvent, None]:
        """Events under ``prefix`` from ``start_revision`` (<= 0: from now on), then new ones as written."""
        return self._watch(prefix, start_revision)

    async def _watch(self, prefix: str, start_revision: int) -> AsyncGenerator[WatchEvent, None]:
        start = _key(prefix)
        end = prefix_end(start)
        query = ("SELECT type, key, value, create_revision, revision, version, lease FROM history "
                 "WHERE revision BETWEEN ? AND ? AND key >= ?" + (" AND key < ?" if end is not None else "") +
                 " ORDER BY revision, seq")

        def page(first: int) -> tuple[list, int, int]:
            """Whole revisions ``first..last`` (at most WATCH_PAGE of them), ``last`` and the store revision."""
            compact_revision = self._meta("compact_revision")
            if first < compact_revision:
                raise Compacted(first, compact_revision)
            revision = self._meta("revision")
            last = min(revision, first + WATCH_PAGE - 1)
            args = (first, last, start) + ((end,) if end is not None else ())
            return self._conn.execute(query, args).fetchall(), last, revision

        next_revision = start_revision
        if next_revision <= 0:
            next_revision = (await self._run(self._meta, "revision")) + 1
        while True:
            changed = self._changed        # taken before the read: any later write sets this event
            rows, last, revision = await self._run(page, next_revision)
            for kind, key, value, create_revision, mod_revision, version, lease in rows:
                yield WatchEvent(kind, KeyValue(bytes(key).decode(), bytes(value), create_revision, mod_revision,
                                                version, lease))
            next_revision = max(next_revision, last + 1)
            if last >= revision:
                await changed.wait()

    async def close(self) -> None:
        if self._closed:
            return
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            try:
                await self._expiry_task
            except asyncio.CancelledError:
                pass
        await self._run(self._disconnect)
        self._closed = True
        self._notify()                 # watchers waiting for a write see the store closed
        self._executor.shutdown(wait=True)

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- lease expiry ------------------------------------------------------------------------------

    async def _expire_leases(self) -> None:
        """Reap expired leases: delete their keys (delete events, one revision each) as deadlines pass."""
        def reap() -> float | None:
            expired = [row[0] for row in self._conn.execute(
                "SELECT id FROM leases WHERE expires_at <= ? ORDER BY expires_at", (time.time(),))]
            for lease in expired:
                self._in_txn(functools.partial(self._revoke, lease))
            return self._conn.execute("SELECT MIN(expires_at) FROM leases").fetchone()[0]

        while True:
            self._lease_granted.clear()
            try:
                next_deadline = await self._run(reap)
            except StoreError:
                next_deadline = None                # transient (disk busy): try again after the bounded sleep
            delay = EXPIRY_MAX_SLEEP_S if next_deadline is None else next_deadline - time.time()
            try:
                await asyncio.wait_for(self._lease_granted.wait(), max(0.0, min(delay, EXPIRY_MAX_SLEEP_S)))
            except TimeoutError:
                pass


def _check_integrity(db: sqlite3.Connection, path: str) -> None:
    """Refuse a damaged file at open, so a scheduler exits with the reason instead of running on it.

    ``PRAGMA quick_check`` reads every page (O(size), well under a second for a
    state file of tens of MB) and reports what ``integrity_check`` does except
    index/table consistency. A file that is not a database at all fails earlier,
    on the first PRAGMA, with "file is not a database". A 0-byte file is a valid,
    empty database: it passes (the cluster id guards that case, see identity.py).
    """
    problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
    if problems != ["ok"]:
        raise CorruptStore(f"sqlite store {path} is corrupt: {'; '.join(problems)}")


def _compare_holds(compare: Compare, kv: KeyValue | None) -> bool:
    if compare.create_revision is not None and (kv.create_revision if kv else 0) != compare.create_revision:
        return False
    if compare.mod_revision is not None and (kv.mod_revision if kv else 0) != compare.mod_revision:
        return False
    if compare.value is not None and (kv is None or kv.value != compare.value):
        return False
    return True
