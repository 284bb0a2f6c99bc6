"""Whose shared memory regions a call may see: the client's scope, from its gRPC context.

A region belongs to the client that registered it (runtime/shared_memory.py).
The client is its authenticated identity when it has one (a client
certificate naming ``meshserve://ROLE/NAME``, protos/security/identity.py),
so the same identity sees its regions from any of its connections; without
one, the client is its connection (``context.peer()``: address and port),
so a region is visible only on the connection that registered it.

Guarantees: ``owner_of`` never returns the same key for two different
identities or for an identity and a bare connection ("id:" and "peer:"
prefixes); a call whose peer cannot be told (no ``peer()``) gets a key of its
own that nothing else gets, so it shares regions with nobody; an in-process
call (no context) is ``LOCAL_OWNER``. ``identity_of``
is the one place a future authentication layer (tokens) plugs its caller's
identity in.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

from meshserve.common.peer_connections import PeerKey, peer_key
from meshserve.common.security.identity import Identity, from_certificate

from .shared_memory import LOCAL_OWNER

# A few distinct client certificates are all a server sees; parsing one costs ~50 µs.
_CERTIFICATE_CACHE = 256
_anonymous = itertools.count()


class Scope(NamedTuple):
    owner: str                      # whose regions
    connection: PeerKey | None      # the calling connection, None when it cannot be told


@functools.lru_cache(maxsize=_CERTIFICATE_CACHE)
def _certificate_identity(pem: bytes) -> Identity | None:
    try:
        return from_certificate(pem)
    except ValueError:
        return None


def identity_of(context) -> Identity | None:
    """The caller's identity from its verified client certificate, None without one."""
    try:
        auth = context.auth_context() or {}
    except (AttributeError, NotImplementedError):
        return None
    certificates = auth.get("x509_pem_cert") or ()
    return _certificate_identity(certificates[0]) if certificates else None


def scope_of(context) -> Scope:
    """The scope of the calling client (see the module docstring)."""
    if context is None:             # an in-process call, no gRPC client
        return Scope(LOCAL_OWNER, None)
    peer = context.peer()
    connection = peer_key(peer) if peer else None
    who = identity_of(context)
    if who is not None:
        return Scope(f"id:{who.uri}", connection)
    if peer:
        return Scope(f"peer:{peer}", connection)
    return Scope(f"anonymous:{next(_anonymous)}", None)
