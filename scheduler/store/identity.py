"""A store's cluster identity: one key, created once, that names the cluster the store holds.

etcd has a cluster ID; a meshserve store gets one too, so that an agent can
tell a scheduler serving *its* cluster from one serving an empty or foreign
store (a wrong ``--store`` path, a ``state.db`` truncated to 0 bytes, a fresh
etcd). Without it such a scheduler looks like a cluster that wants nothing
running, and every agent would drain every replica.

``ensure_cluster_id(store)`` is called by ``scheduler serve`` before it
campaigns:

- the key exists: that is the cluster id (it never changes afterwards);
- the key is absent: a new random id is created with one create-if-absent
  transaction, so two schedulers starting together on one etcd agree on one
  id. This happens for a brand-new store (no other ``/meshserve/`` keys:
  logged as a new cluster) and also for a store that already holds state but
  no id — one written before cluster ids existed: its state is adopted under
  the new id (logged as such). Agents that joined such a cluster before
  cluster ids existed remember no id yet, so they accept it and remember it.
"""

from __future__ import annotations

import logging
import secrets

from .base import Compare, Put, Store, StoreError

log = logging.getLogger(__name__)

CLUSTER_ID_KEY = "/meshserve/cluster/id"
# Keys that say nothing about whether a store holds a cluster: an election key
# exists as soon as any scheduler campaigns, even on an empty store.
_NOT_STATE = ("/meshserve/election/", CLUSTER_ID_KEY)


def new_cluster_id() -> str:
    return secrets.token_hex(8)


async def ensure_cluster_id(store: Store) -> str:
    """The store's cluster id, created (once, atomically) when the store has none."""
    existing = await store.get(CLUSTER_ID_KEY)
    if existing is not None:
        return existing.value.decode()
    state, _ = await store.range("/meshserve/")
    holds_state = any(not kv.key.startswith(_NOT_STATE) for kv in state)
    candidate = new_cluster_id()
    result = await store.txn([Compare(CLUSTER_ID_KEY, create_revision=0)], [Put(CLUSTER_ID_KEY, candidate.encode())])
    if not result.succeeded:          # another scheduler created it first: take theirs
        theirs = result.observed[0]
        if theirs is None:            # created and deleted again meanwhile: nobody may do that
            raise StoreError(f"{CLUSTER_ID_KEY} was created and removed while this scheduler read it")
        return theirs.value.decode()
    if holds_state:
        log.warning("store holds cluster state but no cluster id (written before cluster ids existed): "
                    "adopting it as cluster %s", candidate)
    else:
        log.warning("empty store: created a NEW cluster %s; agents that belong to another cluster "
                    "will refuse this scheduler", candidate)
    return candidate
