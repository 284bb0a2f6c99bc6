"""The store seam and its backends; ``open_store(url)`` picks one from a URL.

    sqlite:///var/lib/meshserve/state.db     embedded, one host (the default)
    etcd://127.0.0.1:2379[,host:port...]     etcd v3, several hosts and schedulers
"""

from __future__ import annotations

from .base import (
    Compacted,
    Compare,
    CorruptStore,
    Delete,
    KeyValue,
    LeaseExpired,
    Put,
    Store,
    StoreError,
    TxnResult,
    WatchEvent,
)

__all__ = ["Compacted", "Compare", "CorruptStore", "Delete", "KeyValue", "LeaseExpired", "Put", "Store", "StoreError",
           "TxnResult", "WatchEvent", "open_store"]


async def open_store(url: str, etcd_security=None) -> Store:
    """Open the backend a URL names; raises ValueError naming the URL when it names none.

    ``etcd_security`` (an ``etcd_security.EtcdSecurity``): TLS and authentication for an etcd store.
    """
    if url.startswith("sqlite://"):
        from .sqlite import SqliteStore

        return await SqliteStore.open(url[len("sqlite://"):])
    if url.startswith("etcd://"):
        from .etcd import EtcdStore

        return await EtcdStore.open(url[len("etcd://"):].split(","), security=etcd_security)
    raise ValueError(f"store URL {url!r}: use sqlite:///path/state.db or etcd://host:port[,host:port]")
