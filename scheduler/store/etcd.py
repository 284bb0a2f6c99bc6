"""The etcd v3 store backend, over ``aetcd`` (asyncio, grpc.aio): several hosts, several schedulers.

What this module adds to the client library, and why:

- **Several endpoints.** aetcd talks to one ``host:port``. We hold one client
  per endpoint and use one at a time; a connection error moves to the next
  endpoint and the call is retried there once. Reads, keep-alives, lease
  grants and revokes and compactions retry after any connection error. A
  ``put``/``delete`` retries after UNAVAILABLE (rewriting the same value is
  harmless). A ``txn`` retries only when the request surely never reached a
  server (connection refused, no leader): a retried create-if-absent that had
  in fact committed would report failure. Callers of ``txn`` that must tell
  these apart compare ``observed`` with what they wrote (the election does).
- **Errors** come out as the seam's: ``StoreError`` (unreachable, timeout,
  anything else), ``LeaseExpired`` (keep-alive TTL 0, or a put naming a gone
  lease), ``Compacted`` (a watch from a compacted revision). Invalid requests
  (a txn writing one key twice, compacting a future revision) raise ValueError.
- **Watches never lose an event**: after a dropped stream (server restart,
  member failover) the watch reconnects, on the next endpoint, from the last
  *delivered* event's ``mod_revision + 1`` (never from a response header's
  revision, which runs ahead during replay), for up to ``watch_reconnect_s``;
  then it raises ``StoreError`` and the caller resumes the same way. A
  revision compacted meanwhile raises ``Compacted``.
- **Transactions** go through the KV stub aetcd exposes, because aetcd's
  ``transaction()`` drops the response header (the revision). The observed
  values are read inside the same transaction (a range op per compare, ahead
  of the writes), so they are what the comparisons saw.
- **keep_alive** sends one refresh; aetcd returns the reply as is, and a TTL
  of 0 there means the lease is gone: we raise ``LeaseExpired``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TypeVar

import aetcd
import grpc
from aetcd import rpc

from .base import (
    Compacted,
    Compare,
    Delete,
    KeyValue,
    LeaseExpired,
    Put,
    StoreError,
    TxnResult,
    WatchEvent,
    prefix_end,
    store_unavailable,
)
from .etcd_security import EtcdSecurity

T = TypeVar("T")

# etcd answers in milliseconds when healthy; a leader election takes about one
# election timeout (1 s by default). 5 s bounds a call to a partitioned member.
REQUEST_TIMEOUT_S = 5.0
# A watch rides out an outage this long (an etcd restart or a member failover
# takes a few seconds) before it gives up with StoreError.
WATCH_RECONNECT_S = 15.0
# Reconnect backoff of a watch: short at first (a restarted etcd is back at once).
WATCH_BACKOFF_S = (0.05, 1.0)
# gRPC channel options: reconnect quickly after a restart, and ping an active
# stream so a silently dead connection (no RST) fails the watch instead of
# hanging it. etcd refuses pings more often than every 5 s (its
# --grpc-keepalive-min-time) and pings on idle connections.
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 0,
}
# Messages of errors after which a request surely never reached the state machine.
_NEVER_SENT = ("failed to connect", "connection refused", "no leader", "not connected")

_CONNECTION_ERRORS = (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError, aetcd.WatchTimeoutError)



def _kv(kv) -> KeyValue:
    return KeyValue(kv.key.decode(), bytes(kv.value), kv.create_revision, kv.mod_revision, kv.version, kv.lease)


def _split(endpoint: str) -> tuple[str, int]:
    endpoint = endpoint.strip()
    for scheme in ("http://", "https://"):
        if endpoint.startswith(scheme):
            endpoint = endpoint[len(scheme):]
    host, sep, port = endpoint.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"etcd endpoint {endpoint!r}: use host:port")
    return host, int(port)


def _details(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.details() or exc.code().name
    return str(exc)


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return isinstance(exc, (*_CONNECTION_ERRORS, asyncio.TimeoutError))


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() == grpc.StatusCode.UNAVAILABLE
    return isinstance(exc, aetcd.ConnectionFailedError)


def _never_sent(exc: BaseException) -> bool:
    return _is_unavailable(exc) and any(text in _details(exc).lower() for text in _NEVER_SENT)


def _translate(exc: BaseException, what: str, endpoint: str) -> Exception:
    """The seam's error for a client or gRPC error; a StoreError names the endpoint that failed."""
    details = _details(exc)
    if "lease not found" in details:
        return LeaseExpired(f"{what}: {details}")
    if "duplicate key" in details or "future revision" in details or isinstance(exc, aetcd.InvalidArgumentError):
        return ValueError(f"{what}: {details}")
    return store_unavailable("etcd", endpoint, f"{what}: {details}")


RetryRule = Callable[[BaseException], bool]


def _etcd_range_end(prefix: bytes) -> bytes:
    """etcd's range end for a prefix (b"\\0": to the end of the keyspace)."""
    return prefix_end(prefix) or b"\0"


class EtcdStore:
    """The etcd backend; create it with ``await EtcdStore.open(["host:port", ...])``."""

    def __init__(self, endpoints: list[str], timeout_s: float = REQUEST_TIMEOUT_S,
                 watch_reconnect_s: float = WATCH_RECONNECT_S, security: EtcdSecurity | None = None):
        if not endpoints:
            raise ValueError("etcd store: no endpoints")
        self.endpoints = [f"{host}:{port}" for host, port in map(_split, endpoints)]
        self.timeout_s = timeout_s
        self.watch_reconnect_s = watch_reconnect_s
        security = security or EtcdSecurity()   # TLS and user/password auth (etcd_security.py)
        self._clients = [security.client(host, port, timeout=timeout_s, options=CHANNEL_OPTIONS)
                         for host, port in map(_split, endpoints)]
        self._current = 0
        self._closed = False

    @classmethod
    async def open(cls, endpoints: list[str], timeout_s: float = REQUEST_TIMEOUT_S,
                   watch_reconnect_s: float = WATCH_RECONNECT_S, security: EtcdSecurity | None = None) -> EtcdStore:
        """Connect and check that some endpoint answers (raises StoreError naming them when none does)."""
        store = cls(endpoints, timeout_s, watch_reconnect_s, security)
        for _ in store._clients:
            index = store._current
            try:
                await store._clients[index].get(b"\0")
                return store
            except Exception as exc:    # noqa: BLE001 - every failure here means "try the next one"
                last = exc
                store._rotate(index)
        await store.close()
        raise StoreError(f"no etcd endpoint answered ({', '.join(store.endpoints)}): {_details(last)}")

    @property
    def endpoint(self) -> str:
        """The endpoint calls go to now (the next one after a connection error)."""
        return self.endpoints[self._current]

    # -- plumbing -------------------------------------------------------------------------------

    def _rotate(self, index: int) -> None:
        if self._current == index:
            self._current = (index + 1) % len(self._clients)

    async def _call(self, what: str, op: Callable[[aetcd.Client], Awaitable[T]],
                    retry: RetryRule = _is_connection_error) -> T:
        """Run ``op`` on the current endpoint; after a connection error move on and retry once if ``retry``."""
        if self._closed:
            raise StoreError(f"{what}: the etcd store is closed")
        for attempt in (0, 1):
            index = self._current
            try:
                return await op(self._clients[index])
            except Exception as exc:    # noqa: BLE001 - translated below
                if _is_connection_error(exc):
                    self._rotate(index)
                    if attempt == 0 and retry(exc):
                        continue
                if isinstance(exc, (StoreError, ValueError)):
                    raise
                raise _translate(exc, what, self.endpoints[index]) from exc
        raise AssertionError("unreachable")

    # -- the Store protocol ------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        reply = await self._call(f"get {key!r}", lambda client: client.get(key.encode()))
        return _kv(reply) if reply is not None else None

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        start = prefix.encode() or b"\0"
        reply = await self._call(f"range {prefix!r}", lambda client: client.get_range(
            start, _etcd_range_end(prefix.encode()), sort_order="ascend", sort_target="key"))
        return [_kv(kv) for kv in reply], reply.header.revision

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        reply = await self._call(f"put {key!r}", lambda client: client.put(key.encode(), bytes(value), lease=lease),
                                 retry=_is_unavailable)
        return reply.header.revision

    async def delete(self, key: str, prefix: bool = False) -> int:
        if prefix:
            start = key.encode() or b"\0"
            reply = await self._call(f"delete prefix {key!r}",
                                     lambda client: client.delete_range(start, _etcd_range_end(key.encode())),
                                     retry=_is_unavailable)
        else:
            reply = await self._call(f"delete {key!r}", lambda client: client.delete(key.encode()),
                                     retry=_is_unavailable)
        return reply.deleted if reply is not None else 0

    async def txn(self, compares: list[Compare], success: list[Put | Delete],
                  failure: Sequence[Put | Delete] = ()) -> TxnResult:
        reads = [rpc.RequestOp(request_range=rpc.RangeRequest(key=compare.key.encode())) for compare in compares]
        request = rpc.TxnRequest(
            compare=[condition for compare in compares for condition in _conditions(compare)],
            success=reads + [_op(op) for op in success],
            failure=reads + [_op(op) for op in failure])

        async def send(client: aetcd.Client):
            await client.connect()
            return await client.kvstub.Txn(request, timeout=self.timeout_s, metadata=client.metadata)

        reply = await self._call("txn", send, retry=_never_sent)
        observed = []
        for response in reply.responses[:len(compares)]:
            kvs = response.response_range.kvs
            observed.append(_kv(kvs[0]) if kvs else None)
        return TxnResult(reply.succeeded, reply.header.revision, observed)

    async def grant_lease(self, ttl_s: int) -> int:
        lease = await self._call("grant lease", lambda client: client.lease(int(ttl_s)))
        return lease.id

    async def keep_alive(self, lease: int) -> int:
        reply = await self._call(f"keep-alive of lease {lease}", lambda client: client.refresh_lease(lease))
        if reply is None:
            raise StoreError(f"keep-alive of lease {lease}: the stream closed without a reply")
        if reply.TTL <= 0:
            raise LeaseExpired(f"lease {lease} is gone")
        return reply.TTL

    async def revoke_lease(self, lease: int) -> None:
        try:
            await self._call(f"revoke lease {lease}", lambda client: client.revoke_lease(lease))
        except LeaseExpired:
            pass                       # already gone: revoking is idempotent

    async def compact(self, revision: int) -> None:
        try:
            await self._call(f"compact to {revision}", lambda client: client.compact(revision))
        except StoreError as exc:
            if "has been compacted" not in str(exc):   # already compacted that far: nothing to do
                raise

    async def _revision(self) -> int:
        """The store revision now (a range over the single key b"\\0", which nobody writes)."""
        reply = await self._call("read revision", lambda client: client.get_range(b"\0", b"\0\0"))
        return reply.header.revision

    def watch(self, prefix: str, start_revision: int) -> AsyncGenerator[WatchEvent, None]:
        """Events under ``prefix`` from ``start_revision`` (<= 0: from now on), resumed across reconnects."""
        return self._watch(prefix, start_revision)

    async def _watch(self, prefix: str, start_revision: int) -> AsyncGenerator[WatchEvent, None]:
        start, end = prefix.encode() or b"\0", _etcd_range_end(prefix.encode())
        if start_revision <= 0:
            start_revision = await self._revision() + 1
        next_revision = start_revision
        loop = asyncio.get_running_loop()
        outage_since: float | None = None
        backoff = WATCH_BACKOFF_S[0]
        while True:
            if self._closed:
                raise StoreError(f"watch {prefix!r}: the etcd store is closed")
            index = self._current
            client = self._clients[index]
            watch = None
            floor = next_revision          # the stream starts here; anything older was delivered already
            try:
                watch = await asyncio.wait_for(client.watch(start, range_end=end, start_revision=floor),
                                               self.timeout_s)
                async for event in watch:
                    kv = _kv(event.kv)
                    if kv.mod_revision < floor:
                        continue           # defensive: etcd never sends these
                    outage_since, backoff = None, WATCH_BACKOFF_S[0]
                    yield WatchEvent("put" if event.kind == "PUT" else "delete", kv)
                    # Resume after the last *delivered* event. A revision's events arrive
                    # together in one response, so a drop never splits one revision.
                    next_revision = kv.mod_revision + 1
                # The stream ended without an error: the client was closed, or etcd
                # cancelled the watch. Either way reconnect (or stop if we are closed).
            except aetcd.RevisionCompactedError as exc:
                raise Compacted(next_revision, exc.compacted_revision) from exc
            except Exception as exc:    # noqa: BLE001 - any other failure: reconnect and resume
                if not (_is_connection_error(exc) or isinstance(exc, aetcd.ClientError)):
                    raise
                self._rotate(index)
                now = loop.time()
                outage_since = now if outage_since is None else outage_since
                if now - outage_since > self.watch_reconnect_s:
                    raise StoreError(f"watch {prefix!r} from revision {next_revision}: etcd unreachable for "
                                     f"{now - outage_since:.1f} s: {_details(exc)}") from exc
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, WATCH_BACKOFF_S[1])
            finally:
                if watch is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(watch.cancel(), 1.0)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.close()


def _conditions(compare: Compare) -> list:
    key = compare.key.encode()
    conditions = []
    if compare.create_revision is not None:
        conditions.append(rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE,
                                      create_revision=compare.create_revision))
    if compare.mod_revision is not None:
        conditions.append(rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD,
                                      mod_revision=compare.mod_revision))
    if compare.value is not None:
        conditions.append(rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE,
                                      value=compare.value))
    return conditions


def _op(op: Put | Delete):
    if isinstance(op, Put):
        return rpc.RequestOp(request_put=rpc.PutRequest(key=op.key.encode(), value=bytes(op.value), lease=op.lease))
    if op.prefix:
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
            key=op.key.encode() or b"\0", range_end=_etcd_range_end(op.key.encode())))
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=op.key.encode()))
