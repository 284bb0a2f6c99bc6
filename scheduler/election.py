"""Leader election among schedulers, over the store seam only (so SQLite and etcd alike).

etcd's concurrency recipe, one key per election:

- A candidate holds a lease kept alive from a background task every TTL/3.
- ``campaign()`` is one transaction: create the leader key (attached to the
  lease) if its ``create_revision`` is 0, i.e. it does not exist. A loser
  watches the key from the holder's ``mod_revision + 1`` and tries again when
  it is deleted: when the leader resigns, or its process dies and its lease
  expires, so a standby takes over within about one TTL.
- Every leader write carries ``fence()``: a compare on the leader key's
  ``create_revision``. A deposed leader's write then fails even if it has not
  noticed yet, because a new leader's key has another create revision.
- The leader declares itself lost (``lost`` set, ``is_leader`` False) when a
  keep-alive finds the lease gone, when no keep-alive has succeeded for one
  TTL since it was sent (measured on the monotonic clock from before the
  send, so it is never later than the store's own expiry), or when the key
  is deleted or replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time

from .store.base import Compacted, Compare, Delete, KeyValue, LeaseExpired, Put, Store, StoreError

log = logging.getLogger(__name__)

ELECTION_PREFIX = "/meshserve/election/"
# After a store error, wait this long before trying again (bounded by TTL/3 too).
RETRY_S = 0.5


class Election:
    """One candidate in the election ``name``; see the module docstring for the protocol."""

    def __init__(self, store: Store, name: str, candidate_id: str, address: str, ttl_s: float = 10.0):
        if ttl_s <= 0:
            raise ValueError(f"election {name!r}: ttl_s must be positive, not {ttl_s}")
        self.store = store
        self.name = name
        self.key = ELECTION_PREFIX + name
        self.candidate_id = candidate_id
        self.address = address
        self.ttl_s = ttl_s
        self.lost = asyncio.Event()      # set when leadership is lost; cleared when it is won again
        self._value = json.dumps({"id": candidate_id, "address": address}).encode()
        self._lease = 0
        self._create_revision = 0        # of the leader key we created; 0: never led
        self._leading = False
        self._keep_alive_task: asyncio.Task | None = None
        self._monitor_task: asyncio.Task | None = None

    @property
    def is_leader(self) -> bool:
        return self._leading and not self.lost.is_set()

    async def campaign(self) -> None:
        """Return once this candidate leads. Store errors are retried; cancel to give up."""
        while True:
            try:
                lease = await self._ensure_lease()
                result = await self.store.txn([Compare(self.key, create_revision=0)],
                                              [Put(self.key, self._value, lease)])
            except LeaseExpired:
                self._lease_gone(self._lease)      # a new lease on the next round
                continue
            except StoreError as exc:
                log.warning("election %s: campaign: %s", self.name, exc)
                await asyncio.sleep(self._retry_s())
                continue
            holder = result.observed[0]
            if result.succeeded:
                self._won(result.revision)
                return
            if holder is not None and holder.lease == lease:
                # Our own key: a retried transaction that had committed the first time.
                self._won(holder.create_revision)
                return
            if holder is not None:
                await self._wait_for_delete(holder.mod_revision + 1)

    async def leader(self) -> tuple[str, str] | None:
        """The current leader's (candidate id, address), or None when there is none."""
        kv = await self.store.get(self.key)
        if kv is None:
            return None
        record = json.loads(kv.value)
        return record["id"], record["address"]

    def fence(self) -> Compare:
        """The compare every leader write must include in its txn: our leader key still stands."""
        if not self._create_revision:
            raise RuntimeError(f"election {self.name!r}: {self.candidate_id} has never led, so cannot fence")
        return Compare(self.key, create_revision=self._create_revision)

    async def resign(self) -> None:
        """Give up leadership (if held) and the lease; ``lost`` is set if we led. Cancel a running campaign first."""
        await _cancel(self._monitor_task)        # our own delete below is no news to us
        if self._leading:
            with contextlib.suppress(StoreError):
                await self.store.txn([self.fence()], [Delete(self.key)])
            self._lose("resigned")
        await _cancel(self._keep_alive_task)
        self._monitor_task = self._keep_alive_task = None
        lease, self._lease = self._lease, 0
        if lease:
            with contextlib.suppress(StoreError):
                await self.store.revoke_lease(lease)

    # -- internals -------------------------------------------------------------------------------

    def _retry_s(self) -> float:
        return min(RETRY_S, self.ttl_s / 3)

    async def _ensure_lease(self) -> int:
        if not self._lease:
            sent = time.monotonic()
            self._lease = await self.store.grant_lease(math.ceil(self.ttl_s))
            await _cancel(self._keep_alive_task)
            self._keep_alive_task = asyncio.get_running_loop().create_task(
                self._keep_alive(self._lease, sent + self.ttl_s), name=f"election {self.name} keep-alive")
        return self._lease

    async def _keep_alive(self, lease: int, deadline: float) -> None:
        """Refresh every TTL/3; the lease is presumed gone at ``deadline`` (last successful send + TTL)."""
        interval = self.ttl_s / 3
        next_send = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, min(next_send, deadline) - time.monotonic()))
            now = time.monotonic()
            if now >= deadline:
                self._lease_gone(lease, "no keep-alive succeeded within one TTL")
                return
            try:
                await asyncio.wait_for(self.store.keep_alive(lease), deadline - now)
            except LeaseExpired:
                self._lease_gone(lease, "the lease expired")
                return
            except (TimeoutError, StoreError) as exc:
                log.warning("election %s: keep-alive failed: %s", self.name, exc or "timed out")
                next_send = time.monotonic() + self._retry_s()
                continue
            deadline = now + self.ttl_s
            next_send = now + interval

    def _lease_gone(self, lease: int, why: str = "the lease expired") -> None:
        if lease and lease == self._lease:
            self._lease = 0
            if self._leading:
                self._lose(why)

    def _won(self, create_revision: int) -> None:
        self._create_revision = create_revision
        self._leading = True
        self.lost.clear()
        log.info("election %s: %s leads (revision %d)", self.name, self.candidate_id, create_revision)
        self._monitor_task = asyncio.get_running_loop().create_task(
            self._monitor(create_revision), name=f"election {self.name} monitor")

    def _lose(self, why: str) -> None:
        if self._leading:
            log.warning("election %s: %s lost leadership: %s", self.name, self.candidate_id, why)
        self._leading = False
        self.lost.set()
        if self._monitor_task is not None and self._monitor_task is not asyncio.current_task():
            self._monitor_task.cancel()

    async def _monitor(self, create_revision: int) -> None:
        """While leading: lose leadership when our key is deleted or replaced."""
        start = create_revision + 1
        while self._leading:
            try:
                async with contextlib.aclosing(self.store.watch(self.key, start)) as events:
                    async for event in events:
                        if event.kv.key != self.key:
                            continue
                        if event.type == "delete" or event.kv.create_revision != create_revision:
                            self._lose("the leader key was deleted or replaced")
                            return
                        start = event.kv.mod_revision + 1
            except Compacted:
                kv, revision = await self._read_key()
                if kv is None or kv.create_revision != create_revision:
                    self._lose("the leader key was deleted or replaced")
                    return
                start = revision + 1
            except StoreError as exc:
                log.warning("election %s: watching the leader key: %s", self.name, exc)
                await asyncio.sleep(self._retry_s())

    async def _read_key(self) -> tuple[KeyValue | None, int]:
        """The leader key and the read's revision, retrying store errors."""
        while True:
            try:
                kvs, revision = await self.store.range(self.key)
                return next((kv for kv in kvs if kv.key == self.key), None), revision
            except StoreError:
                await asyncio.sleep(self._retry_s())

    async def _wait_for_delete(self, start_revision: int) -> None:
        """Return when the leader key is deleted at or after ``start_revision`` (or after one TTL: try again)."""
        try:
            async with asyncio.timeout(self.ttl_s), \
                    contextlib.aclosing(self.store.watch(self.key, start_revision)) as events:
                async for event in events:
                    if event.kv.key == self.key and event.type == "delete":
                        return
        except (TimeoutError, Compacted):
            return
        except StoreError as exc:
            log.warning("election %s: watching the leader key: %s", self.name, exc)
            await asyncio.sleep(self._retry_s())


async def _cancel(task: asyncio.Task | None) -> None:
    if task is None or task is asyncio.current_task():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
