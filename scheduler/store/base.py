"""The store seam: a versioned key-value store with transactions, leases and resumable watches.

Two backends honour this one contract (tests/test_store_contract.py runs the
same tests against both): ``sqlite`` (embedded, one host) and ``etcd``
(several hosts, several schedulers). The semantics are etcd's, so the
scheduler can rely on them everywhere:

- Every write bumps one store-wide ``revision``. A key remembers the
  revision that created it (``create_revision``) and last changed it
  (``mod_revision``); a deleted and re-created key gets a new
  ``create_revision``.
- ``txn`` is atomic: all comparisons hold and the success operations apply,
  or none apply and the failure operations do. ``Compare(key,
  create_revision=0)`` means "the key does not exist" (create-if-absent);
  comparing ``mod_revision`` is compare-and-swap; comparing a leader key's
  ``create_revision`` fences a write to the current leader.
- A lease expires ``ttl`` seconds after its last keep-alive; its keys are
  deleted then (and watchers see the deletes).
- ``watch(prefix, start_revision)`` yields every change under ``prefix``
  with ``mod_revision >= start_revision``, in revision order, then follows
  new ones. Resume after the last event you handled with its
  ``mod_revision + 1``. If that revision was compacted away, the watch
  raises ``Compacted``: read the prefix again and watch from the read's
  revision + 1.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from meshserve.common.errors import Unavailable


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int = 1           # number of writes since creation
    lease: int = 0


@dataclass(frozen=True)
class WatchEvent:
    type: str                  # "put" | "delete"
    kv: KeyValue               # for a delete: the key, value b"", mod_revision = the delete's revision


@dataclass(frozen=True)
class Compare:
    """A transaction guard on one key; each given field must equal the key's."""

    key: str
    create_revision: int | None = None   # 0: the key must not exist
    mod_revision: int | None = None
    value: bytes | None = None


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    # For each Compare, the key as it was when the transaction ran (None: absent),
    # so a loser learns who holds a lock without another read.
    observed: list[KeyValue | None] = field(default_factory=list)


def prefix_end(prefix: bytes) -> bytes | None:
    """The first key after every key that starts with ``prefix`` (None: no upper bound)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return None


class StoreError(Unavailable):
    """The store could not be reached or answered an error; safe to retry.

    It is the taxonomy's ``Unavailable``: a call that fails on the store reaches
    its client as UNAVAILABLE with this message (which names the store), through
    the one status interceptor, never as INTERNAL with a traceback."""


def store_unavailable(backend: str, where: str, why: str) -> StoreError:
    """The error of a call the store did not answer: ``store etcd at 127.0.0.1:2379 unavailable: WHY``."""
    return StoreError(f"store {backend} at {where} unavailable: {why}")


def names_an_unavailable_store(message: str) -> bool:
    """Whether a status message is a ``store_unavailable`` one (a scheduler up, its store down)."""
    return message.startswith("store ") and " unavailable: " in message


class Compacted(StoreError):
    """A watch asked for a revision the store no longer keeps."""

    def __init__(self, requested: int, compact_revision: int):
        super().__init__(f"revision {requested} is compacted (oldest kept: {compact_revision})")
        self.requested = requested
        self.compact_revision = compact_revision


class CorruptStore(StoreError):
    """The store's data is damaged ("database disk image is malformed"): not safe to retry or to run on."""


class LeaseExpired(StoreError):
    """A keep-alive found the lease gone: grant a new one and rewrite its keys."""


class Store(Protocol):
    """The seam. All methods are coroutines safe to call from the event loop."""

    async def get(self, key: str) -> KeyValue | None: ...

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys under ``prefix`` (sorted by key) and the store revision of the read."""

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write unconditionally; returns the new revision."""

    async def delete(self, key: str, prefix: bool = False) -> int:
        """Delete a key (or every key under a prefix); returns how many were deleted."""

    async def txn(self, compares: list[Compare], success: list[Put | Delete],
                  failure: Sequence[Put | Delete] = ()) -> TxnResult: ...

    async def grant_lease(self, ttl_s: int) -> int:
        """A new lease id; it expires ttl_s seconds after the last keep-alive."""

    async def keep_alive(self, lease: int) -> int:
        """Refresh once; returns the remaining TTL. Raises LeaseExpired if the lease is gone."""

    async def revoke_lease(self, lease: int) -> None: ...

    def watch(self, prefix: str, start_revision: int) -> AsyncGenerator[WatchEvent, None]: ...

    async def compact(self, revision: int) -> None:
        """Forget history before ``revision`` (watches from earlier raise Compacted)."""

    async def close(self) -> None: ...
