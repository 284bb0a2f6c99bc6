"""Leader election over the store seam, on both backends.

``sqlite``: both candidates share one store (watchers live with the writer).
``etcd``: each candidate has its own client, as schedulers on two hosts would.
A "dead" leader is a candidate whose store calls all fail from some moment
(:class:`Partition`): its keep-alives stop, as if its process were killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import pytest
from etcd_server import etcd_endpoint, etcd_server  # noqa: F401  (pytest fixtures)

from meshserve.scheduler.election import Election
from meshserve.scheduler.store import Compare, Delete, Put, StoreError
from meshserve.scheduler.store.etcd import EtcdStore
from meshserve.scheduler.store.sqlite import SqliteStore

TTL_S = 2
# How late a takeover may be beyond one TTL: etcd reaps expired leases every
# 0.5 s; then a watch event and one transaction.
TAKEOVER_SLACK_S = 1.5
TEST_TIMEOUT_S = 20.0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT_S))


class Partition:
    """A store whose calls all fail with StoreError while ``cut`` is set (a dead or cut-off process)."""

    def __init__(self, store):
        self._store = store
        self.cut = False

    def __getattr__(self, name):
        target = getattr(self._store, name)
        if name == "watch":
            return lambda *args: self._watch(target(*args))

        async def call(*args, **kwargs):
            if self.cut:
                raise StoreError(f"{name}: partitioned (test)")
            return await target(*args, **kwargs)
        return call

    async def _watch(self, events):
        async with contextlib.aclosing(events):
            async for event in events:
                if self.cut:
                    raise StoreError("watch: partitioned (test)")
                yield event


@pytest.fixture(params=["sqlite", "etcd"])
def open_stores(request, tmp_path):
    """``await open_stores()`` -> (store for candidate a, store for candidate b, close)."""
    if request.param == "sqlite":
        async def opener():
            store = await SqliteStore.open(str(tmp_path / "state.db"))
            return store, store, store.close
    else:
        endpoint = request.getfixturevalue("etcd_endpoint")

        async def opener():
            a, b = await EtcdStore.open([endpoint]), await EtcdStore.open([endpoint])

            async def close():
                await a.close()
                await b.close()
            return a, b, close
    return opener


def candidates(store_a, store_b):
    name = f"test-{uuid.uuid4().hex[:8]}"
    return (Election(store_a, name, "a", "127.0.0.1:7001", ttl_s=TTL_S),
            Election(store_b, name, "b", "127.0.0.1:7002", ttl_s=TTL_S))


def test_one_leads_the_other_waits_and_takes_over_on_resign(open_stores):
    async def body():
        store_a, store_b, close = await open_stores()
        a, b = candidates(store_a, store_b)
        try:
            with pytest.raises(RuntimeError):
                a.fence()                                  # never led: nothing to fence with
            assert await a.leader() is None
            await a.campaign()
            assert a.is_leader and not a.lost.is_set()
            standby = asyncio.create_task(b.campaign())
            await asyncio.sleep(0.3)
            assert not standby.done() and not b.is_leader
            assert await a.leader() == await b.leader() == ("a", "127.0.0.1:7001")
            ok = await store_a.txn([a.fence()], [Put(f"/test/{a.name}/state", b"by a")])
            assert ok.succeeded

            started = time.monotonic()
            await a.resign()
            await asyncio.wait_for(standby, TTL_S)
            assert time.monotonic() - started < TTL_S      # a resignation is seen at once, not after a TTL
            assert b.is_leader and a.lost.is_set() and not a.is_leader
            assert await a.leader() == ("b", "127.0.0.1:7002")

            deposed = await store_a.txn([a.fence()], [Put(f"/test/{a.name}/state", b"by a, late")])
            assert not deposed.succeeded
            fenced = await store_b.txn([b.fence()], [Put(f"/test/{a.name}/state", b"by b")])
            assert fenced.succeeded
            assert (await store_a.get(f"/test/{a.name}/state")).value == b"by b"
        finally:
            await b.resign()
            await a.resign()
            await close()
    run(body())


def test_dead_leader_loses_its_lease_and_the_standby_takes_over(open_stores):
    async def body():
        store_a, store_b, close = await open_stores()
        partition = Partition(store_a)
        a, b = candidates(partition, store_b)
        try:
            await a.campaign()
            standby = asyncio.create_task(b.campaign())
            await asyncio.sleep(0.2)
            assert not standby.done()

            died = time.monotonic()
            partition.cut = True                           # a's keep-alives fail from now on
            await asyncio.wait_for(standby, TTL_S + TAKEOVER_SLACK_S + 2)
            took = time.monotonic() - died
            assert took < TTL_S + TAKEOVER_SLACK_S, f"takeover took {took:.2f} s"
            assert b.is_leader
            assert a.lost.is_set() and not a.is_leader     # a knew before b could lead

            partition.cut = False                          # a comes back, still believing nothing
            deposed = await store_a.txn([a.fence()], [Put(f"/test/{a.name}/state", b"by a")])
            assert not deposed.succeeded
            assert await store_a.get(f"/test/{a.name}/state") is None
            assert (await store_b.txn([b.fence()], [Put(f"/test/{a.name}/state", b"by b")])).succeeded
        finally:
            partition.cut = False
            await b.resign()
            await a.resign()
            await close()
    run(body())


def test_leader_key_deleted_sets_lost_and_leadership_can_be_won_again(open_stores):
    async def body():
        store_a, store_b, close = await open_stores()
        a, b = candidates(store_a, store_b)
        try:
            await a.campaign()
            first_fence = a.fence()
            await store_b.delete(a.key)                    # e.g. an operator removed it
            await asyncio.wait_for(a.lost.wait(), TTL_S)
            assert not a.is_leader
            await asyncio.wait_for(a.campaign(), TTL_S)
            assert a.is_leader and not a.lost.is_set()
            assert a.fence() != first_fence                # a new term: a new fencing revision
            assert not (await store_a.txn([first_fence], [Delete(f"/test/{a.name}/x")])).succeeded
            assert (await store_a.txn([a.fence()], [Delete(f"/test/{a.name}/x")])).succeeded
            assert isinstance(a.fence(), Compare)
        finally:
            await a.resign()
            await b.resign()
            await close()
    run(body())
