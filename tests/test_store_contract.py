"""The store contract (scheduler/store/base.py), run unchanged against both backends.

``sqlite``: a fresh file in tmp_path. ``etcd``: a real etcd on loopback shared
by the session (tests/etcd_server.py); each test writes under its own prefix,
so revisions are compared relative to each other, never to constants.
Leases use TTL 1 s (the etcd fixture's minimum with its 50 ms heartbeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from etcd_server import EtcdCluster, EtcdServer, etcd_endpoint, etcd_server, require_etcd  # noqa: F401 -- fixtures

from meshserve.scheduler.store import (
    Compacted,
    Compare,
    Delete,
    KeyValue,
    LeaseExpired,
    Put,
    StoreError,
    WatchEvent,
    open_store,
)
from meshserve.scheduler.store.etcd import EtcdStore
from meshserve.scheduler.store.sqlite import SqliteStore

# Every test finishes in a few seconds; this bounds a hung one.
TEST_TIMEOUT_S = 20.0
# A 1 s lease is gone within TTL + the backend's reaping delay (etcd checks every 0.5 s).
EXPIRY_WAIT_S = 5.0


def run(coro, timeout: float = TEST_TIMEOUT_S):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@dataclass
class Backend:
    name: str
    open: Callable[[], Awaitable]
    prefix: str

    def run(self, body: Callable) -> None:
        """Open a store, run ``await body(store, prefix)``, close it."""
        async def main():
            store = await self.open()
            try:
                await body(store, self.prefix)
            finally:
                await store.close()
        run(main())


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request, tmp_path) -> Backend:
    prefix = f"/test/{uuid.uuid4().hex[:8]}/"
    if request.param == "sqlite":
        path = str(tmp_path / "state.db")
        return Backend("sqlite", lambda: SqliteStore.open(path), prefix)
    endpoint = request.getfixturevalue("etcd_endpoint")
    return Backend("etcd", lambda: EtcdStore.open([endpoint]), prefix)


async def next_events(events, count: int, timeout: float = 5.0) -> list[WatchEvent]:
    return [await asyncio.wait_for(anext(events), timeout) for _ in range(count)]


def summary(events: list[WatchEvent]) -> list[tuple[str, str, bytes]]:
    return [(event.type, event.kv.key, event.kv.value) for event in events]


# -- keys, revisions, versions ------------------------------------------------------------------


def test_put_get_revisions_and_versions(backend):
    async def body(store, p):
        assert await store.get(p + "a") is None
        first = await store.put(p + "a", b"1")
        kv = await store.get(p + "a")
        assert kv == KeyValue(p + "a", b"1", create_revision=first, mod_revision=first, version=1, lease=0)
        second = await store.put(p + "a", b"2")
        assert second == first + 1
        kv = await store.get(p + "a")
        assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"2", first, second, 2)
        other = await store.put(p + "b", b"x")
        assert other == second + 1                      # one store-wide revision
        assert (await store.get(p + "a")).mod_revision == second
    backend.run(body)


def test_delete_and_recreate(backend):
    async def body(store, p):
        created = await store.put(p + "k", b"old")
        await store.put(p + "k", b"older")
        assert await store.delete(p + "k") == 1
        assert await store.get(p + "k") is None
        _, revision = await store.range(p)
        assert await store.delete(p + "k") == 0          # nothing deleted: no new revision
        assert (await store.range(p))[1] == revision
        recreated = await store.put(p + "k", b"new")
        assert recreated == revision + 1
        kv = await store.get(p + "k")
        assert kv.create_revision == recreated != created
        assert kv.version == 1
    backend.run(body)


def test_range_is_sorted_and_prefix_delete(backend):
    async def body(store, p):
        for key in ["b", "a/2", "c", "a/1", "a", "ab"]:
            last = await store.put(p + key, key.encode())
        await store.put(p[:-1] + "0", b"sibling")       # shares p minus the slash: not under p
        kvs, revision = await store.range(p)
        assert [kv.key for kv in kvs] == [p + key for key in ["a", "a/1", "a/2", "ab", "b", "c"]]
        assert [kv.value for kv in kvs] == [b"a", b"a/1", b"a/2", b"ab", b"b", b"c"]
        assert revision == last + 1
        kvs, _ = await store.range(p + "a/")
        assert [kv.key for kv in kvs] == [p + "a/1", p + "a/2"]
        assert await store.delete(p + "a", prefix=True) == 4
        assert [kv.key for kv in (await store.range(p))[0]] == [p + "b", p + "c"]
        assert await store.get(p[:-1] + "0") is not None
        assert await store.delete(p, prefix=True) == 2
        assert (await store.range(p))[0] == []
        await store.delete(p[:-1] + "0")
    backend.run(body)


# -- transactions ----------------------------------------------------------------------------


def test_txn_create_if_absent(backend):
    async def body(store, p):
        first = await store.txn([Compare(p + "lock", create_revision=0)], [Put(p + "lock", b"me")],
                                [Put(p + "lost", b"1")])
        assert first.succeeded and first.observed == [None]
        assert (await store.get(p + "lock")).mod_revision == first.revision
        second = await store.txn([Compare(p + "lock", create_revision=0)], [Put(p + "lock", b"you")],
                                 [Put(p + "lost", b"1")])
        assert not second.succeeded
        holder = second.observed[0]
        assert (holder.key, holder.value, holder.create_revision) == (p + "lock", b"me", first.revision)
        assert (await store.get(p + "lock")).value == b"me"
        assert (await store.get(p + "lost")).mod_revision == second.revision   # failure ops ran
    backend.run(body)


def test_txn_compare_and_swap(backend):
    async def body(store, p):
        revision = await store.put(p + "x", b"v1")
        swapped = await store.txn([Compare(p + "x", mod_revision=revision)], [Put(p + "x", b"v2")])
        assert swapped.succeeded and swapped.revision == revision + 1
        assert swapped.observed[0].value == b"v1"                 # as it was when compared
        stale = await store.txn([Compare(p + "x", mod_revision=revision)], [Put(p + "x", b"v3")])
        assert not stale.succeeded
        assert stale.revision == swapped.revision                 # nothing written: no new revision
        assert stale.observed[0].value == b"v2" and stale.observed[0].mod_revision == swapped.revision
        assert (await store.get(p + "x")).value == b"v2"
        by_value = await store.txn([Compare(p + "x", value=b"v2"), Compare(p + "y", create_revision=0)],
                                   [Put(p + "x", b"v4"), Put(p + "y", b"new"), Delete(p + "gone")])
        assert by_value.succeeded and by_value.observed[1] is None
        assert (await store.get(p + "x")).mod_revision == (await store.get(p + "y")).mod_revision == by_value.revision
        wrong = await store.txn([Compare(p + "x", value=b"nope")], [Put(p + "x", b"v5")],
                                [Delete(p + "y"), Put(p + "z", b"failed")])
        assert not wrong.succeeded
        assert await store.get(p + "y") is None
        assert (await store.get(p + "z")).value == b"failed"
        assert (await store.get(p + "x")).value == b"v4"
        absent_value = await store.txn([Compare(p + "absent", value=b"")], [Put(p + "absent", b"?")])
        assert not absent_value.succeeded                         # a value compare on a missing key fails
    backend.run(body)


def test_txn_rejects_writing_a_key_twice(backend):
    async def body(store, p):
        with pytest.raises(ValueError):
            await store.txn([], [Put(p + "k", b"1"), Put(p + "k", b"2")])
        assert await store.get(p + "k") is None
    backend.run(body)


# -- leases ----------------------------------------------------------------------------------


def test_lease_revoke_deletes_keys_with_events(backend):
    async def body(store, p):
        lease = await store.grant_lease(10)
        start = await store.put(p + "a", b"1", lease=lease)
        await store.put(p + "b", b"2", lease=lease)
        await store.put(p + "c", b"3")
        assert (await store.get(p + "a")).lease == lease
        assert await store.keep_alive(lease) > 0
        await store.revoke_lease(lease)
        assert [kv.key for kv in (await store.range(p))[0]] == [p + "c"]
        async with contextlib.aclosing(store.watch(p, start)) as events:
            seen = await next_events(events, 5)
        assert summary(seen) == [("put", p + "a", b"1"), ("put", p + "b", b"2"), ("put", p + "c", b"3"),
                                 ("delete", p + "a", b""), ("delete", p + "b", b"")]
        assert seen[3].kv.mod_revision == seen[4].kv.mod_revision > seen[2].kv.mod_revision
        await store.revoke_lease(lease)                     # revoking twice is harmless
        with pytest.raises(LeaseExpired):
            await store.keep_alive(lease)
        with pytest.raises(LeaseExpired):
            await store.put(p + "d", b"4", lease=lease)
    backend.run(body)


def test_lease_expiry_deletes_keys_and_keep_alive_raises(backend):
    async def body(store, p):
        kept = await store.grant_lease(1)
        dropped = await store.grant_lease(1)
        start = await store.put(p + "kept", b"k", lease=kept)
        await store.put(p + "dropped", b"d", lease=dropped)
        async with contextlib.aclosing(store.watch(p, start + 2)) as events:
            deadline = time.monotonic() + EXPIRY_WAIT_S

            async def keep():
                while True:
                    await store.keep_alive(kept)
                    await asyncio.sleep(0.25)
            keeper = asyncio.create_task(keep())
            try:
                (event,) = await next_events(events, 1, timeout=EXPIRY_WAIT_S)
            finally:
                keeper.cancel()
            assert time.monotonic() < deadline
            assert summary([event]) == [("delete", p + "dropped", b"")]
        assert await store.get(p + "dropped") is None
        assert (await store.get(p + "kept")).value == b"k"       # kept alive past its TTL
        with pytest.raises(LeaseExpired):
            await store.keep_alive(dropped)
        with pytest.raises(LeaseExpired):
            await store.txn([], [Put(p + "late", b"x", lease=dropped)])
        await store.revoke_lease(kept)
    backend.run(body)


# -- watches ---------------------------------------------------------------------------------


def test_watch_replays_history_then_follows(backend):
    async def body(store, p):
        first = await store.put(p + "a", b"1")
        await store.put(p + "b", b"2")
        await store.delete(p + "a")
        await store.put(p[:-1] + "-other", b"not watched")
        async with contextlib.aclosing(store.watch(p, first)) as events:
            replayed = await next_events(events, 3)
            assert summary(replayed) == [("put", p + "a", b"1"), ("put", p + "b", b"2"), ("delete", p + "a", b"")]
            assert [event.kv.mod_revision for event in replayed] == [first, first + 1, first + 2]
            later = asyncio.ensure_future(next_events(events, 3))
            await asyncio.sleep(0.05)
            txn = await store.txn([], [Put(p + "c", b"3"), Put(p + "d", b"4")])
            await store.put(p + "b", b"22")
            followed = await later
        assert summary(followed) == [("put", p + "c", b"3"), ("put", p + "d", b"4"), ("put", p + "b", b"22")]
        assert followed[0].kv.mod_revision == followed[1].kv.mod_revision == txn.revision
        assert (followed[2].kv.version, followed[2].kv.create_revision) == (2, first + 1)
        await store.delete(p[:-1] + "-other")
    backend.run(body)


def test_watch_from_now(backend):
    async def body(store, p):
        await store.put(p + "before", b"0")
        async with contextlib.aclosing(store.watch(p, 0)) as events:
            pending = asyncio.ensure_future(next_events(events, 1))
            await asyncio.sleep(0.2)           # the watch is established before the write
            await store.put(p + "after", b"1")
            assert summary(await pending) == [("put", p + "after", b"1")]
    backend.run(body)


def test_watch_resume_misses_nothing_and_repeats_nothing(backend):
    async def body(store, p):
        start = await store.put(p + "0", b"0")
        for i in range(1, 4):
            await store.put(p + str(i), str(i).encode())
        async with contextlib.aclosing(store.watch(p, start)) as events:
            head = await next_events(events, 2)
        await store.txn([], [Put(p + "4", b"4"), Put(p + "5", b"5")])    # written while nobody watches
        await store.delete(p + "0")
        async with contextlib.aclosing(store.watch(p, head[-1].kv.mod_revision + 1)) as events:
            tail = await next_events(events, 5)
            extra = asyncio.ensure_future(anext(events))
            await asyncio.sleep(0.3)
            assert not extra.done()                 # nothing beyond what was written
            extra.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await extra
        assert [key[len(p):] for _, key, _ in summary(head + tail)] == ["0", "1", "2", "3", "4", "5", "0"]
        assert tail[-1].type == "delete"
        revisions = [event.kv.mod_revision for event in head + tail]
        assert revisions == sorted(revisions)
    backend.run(body)


def test_compacted_watch_raises_and_relist_recovers(backend):
    async def body(store, p):
        old = await store.put(p + "a", b"1")
        await store.put(p + "a", b"2")
        keep = await store.put(p + "b", b"3")
        await store.compact(keep)
        await store.compact(keep)                       # compacting again is harmless
        with pytest.raises(Compacted) as caught:
            async with contextlib.aclosing(store.watch(p, old)) as events:
                await next_events(events, 1)
        assert caught.value.requested == old and caught.value.compact_revision >= keep
        assert isinstance(caught.value, StoreError)
        async with contextlib.aclosing(store.watch(p, keep)) as events:     # the compact revision itself is kept
            assert summary(await next_events(events, 1)) == [("put", p + "b", b"3")]
        kvs, revision = await store.range(p)            # the recovery: relist, then watch from revision + 1
        assert [kv.value for kv in kvs] == [b"2", b"3"]
        async with contextlib.aclosing(store.watch(p, revision + 1)) as events:
            pending = asyncio.ensure_future(next_events(events, 1))
            await store.put(p + "c", b"4")
            assert summary(await pending) == [("put", p + "c", b"4")]
        with pytest.raises(ValueError):
            await store.compact(revision + 100)        # a future revision
    backend.run(body)


# -- backend specifics -----------------------------------------------------------------------


def test_sqlite_state_survives_reopen(tmp_path):
    path = str(tmp_path / "state.db")

    async def first_life():
        store = await SqliteStore.open(path)
        start = await store.put("/k/a", b"1")
        await store.put("/k/a", b"2")
        lease = await store.grant_lease(30)
        short = await store.grant_lease(1)
        await store.put("/k/leased", b"x", lease=lease)
        await store.put("/k/short", b"y", lease=short)
        _, revision = await store.range("/k/")
        await store.close()
        return start, revision, lease

    async def second_life(start, revision, lease):
        store = await SqliteStore.open(path)
        try:
            kv = await store.get("/k/a")
            assert (kv.value, kv.create_revision, kv.version) == (b"2", start, 2)
            assert (await store.get("/k/leased")).lease == lease
            assert await store.keep_alive(lease) == 30                  # the lease survived
            async with contextlib.aclosing(store.watch("/k/", start)) as events:
                replay = await next_events(events, 5)                 # history survived too
                assert summary(replay)[:4] == [("put", "/k/a", b"1"), ("put", "/k/a", b"2"),
                                               ("put", "/k/leased", b"x"), ("put", "/k/short", b"y")]
                assert summary(replay)[4] == ("delete", "/k/short", b"")   # expired while closed
                assert replay[4].kv.mod_revision == revision + 1
            assert await store.put("/k/b", b"3") == revision + 2     # the revision carries on
        finally:
            await store.close()

    start, revision, lease = run(first_life())
    time.sleep(1.1)          # the 1 s lease runs out while no store is open (wall clock)
    run(second_life(start, revision, lease))


def test_sqlite_closed_store_raises(tmp_path):
    async def body():
        store = await SqliteStore.open(str(tmp_path / "state.db"))
        events = store.watch("/", 0)
        pending = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.05)
        await store.close()
        with pytest.raises(StoreError):
            await pending
        with pytest.raises(StoreError):
            await store.get("/x")
    run(body())


def test_open_store_urls(tmp_path, etcd_endpoint):  # noqa: F811 -- the fixture imported above
    async def body():
        for url in (f"sqlite://{tmp_path}/state.db", f"etcd://{etcd_endpoint}"):
            store = await open_store(url)
            try:
                await store.put("/test/open_store", url.encode())
                assert (await store.get("/test/open_store")).value == url.encode()
            finally:
                await store.close()
        with pytest.raises(ValueError):
            await open_store("redis://localhost")
    run(body())


async def put_once_reconnected(store: EtcdStore, key: str, value: bytes, deadline_s: float = 10.0) -> int:
    """Put ``key`` as a caller would after an outage: a StoreError while the channel reconnects is retried.

    A refusal while reconnecting wrote nothing; were one a write applied and
    then timed out, its retry would show as a repeated event, which the watch
    assertion of the caller catches.
    """
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return await store.put(key, value)
        except StoreError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def test_etcd_watch_resumes_across_a_server_restart():
    """Kill etcd under a live watch and start it again: the watch carries on, no event lost or repeated."""
    require_etcd()
    server = EtcdServer().start()

    async def body():
        store = await EtcdStore.open([server.endpoint])
        try:
            start = await store.put("/w/0", b"0")
            async with contextlib.aclosing(store.watch("/w/", start)) as events:
                assert summary(await next_events(events, 1)) == [("put", "/w/0", b"0")]
                await store.put("/w/1", b"1")
                assert summary(await next_events(events, 1)) == [("put", "/w/1", b"1")]
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, server.kill)
                pending = asyncio.ensure_future(next_events(events, 3, timeout=10))
                try:
                    await asyncio.sleep(0.3)              # the watch sees the connection drop
                    with pytest.raises(StoreError):
                        await store.get("/w/0")           # unreachable: a StoreError, not a client error
                    await loop.run_in_executor(None, server.start)
                    await put_once_reconnected(store, "/w/2", b"2")
                    await store.txn([], [Put("/w/3", b"3"), Delete("/w/0")])
                    assert summary(await pending) == [("put", "/w/2", b"2"), ("put", "/w/3", b"3"),
                                                      ("delete", "/w/0", b"")]
                finally:
                    pending.cancel()                      # the generator cannot close while a read is on it
                    with contextlib.suppress(BaseException):
                        await pending
        finally:
            await store.close()
    try:
        run(body(), timeout=40)
    finally:
        server.cleanup()


def test_etcd_cluster_fails_over_to_another_endpoint():
    """Three members; the endpoint in use dies: calls retry on the next, a watch resumes there.

    The member killed is a follower: a dead raft leader stalls every write for
    etcd's request timeout (about 6 s) whatever the client does.
    """
    require_etcd()
    cluster = EtcdCluster().start()

    async def body():
        leader = await asyncio.get_running_loop().run_in_executor(None, cluster.leader_index)
        order = sorted(range(len(cluster.members)), key=lambda i: i == leader)   # followers first
        store = await EtcdStore.open([cluster.members[i].endpoint for i in order])
        try:
            assert store.endpoint == cluster.members[order[0]].endpoint
            start = await store.put("/f/a", b"1")
            async with contextlib.aclosing(store.watch("/f/", start)) as events:
                assert summary(await next_events(events, 1)) == [("put", "/f/a", b"1")]
                await asyncio.get_running_loop().run_in_executor(None, cluster.members[order[0]].kill)
                revision = await store.put("/f/b", b"2")  # refused by the dead member, retried on the next
                assert store.endpoint != cluster.members[order[0]].endpoint
                assert (await store.get("/f/b")).mod_revision == revision
                assert summary(await next_events(events, 1, timeout=10)) == [("put", "/f/b", b"2")]
        finally:
            await store.close()
    try:
        run(body(), timeout=40)
    finally:
        cluster.cleanup()
