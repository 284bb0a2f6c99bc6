"""Every write the scheduler makes, fenced by its leadership.

Each write is a transaction guarded by the election's fence (the leader
key's create revision), so a deposed leader that still believes it leads
cannot overwrite its successor's decisions: its write fails with
``NotLeader`` and it steps down.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from meshserve.common.errors import FailedPrecondition

from .store import Compare, Delete, Put, Store


class StoredRecord(Protocol):
    """What the writer stores: a record that knows its key and its JSON (scheduler/records.py)."""

    @property
    def key(self) -> str: ...

    def to_json(self) -> bytes: ...


class NotLeader(FailedPrecondition):
    """This scheduler does not (or no longer) lead; the message names the leader when known."""


class FencedWriter:
    def __init__(self, store: Store, fence: Callable[[], Compare | None]) -> None:
        self._store = store
        self._fence = fence

    async def _commit(self, operations: list[Put | Delete]) -> None:
        fence = self._fence()
        compares = [fence] if fence is not None else []
        result = await self._store.txn(compares, operations)
        if not result.succeeded:
            raise NotLeader("leadership was lost: a newer leader holds the election key")

    async def put(self, record: StoredRecord) -> None:
        await self._commit([Put(record.key, record.to_json())])

    async def put_many(self, records: Sequence[StoredRecord]) -> None:
        if records:
            await self._commit([Put(record.key, record.to_json()) for record in records])

    async def delete(self, record: StoredRecord) -> None:
        await self._commit([Delete(record.key)])
