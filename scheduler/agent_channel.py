"""May an agent's stream carry secrets? Only if it is authenticated TLS or stays on this host.

A deployment's ``env`` may hold credentials (an API key for a model hub).
An assignment travels on the agent's stream; in clear text over a network
anyone on the path reads it, and without a client certificate anyone may
connect as any node and be sent it. So the scheduler sends ``env`` only on a
stream that is TLS with a verified client certificate, or whose peer is a
loopback address (``scheduler dev``, an agent on the scheduler's own host).
"""

from __future__ import annotations

import ipaddress

from meshserve.common.peer_connections import peer_key


def is_loopback_peer(peer: str) -> bool:
    key = peer_key(peer or "")
    return key is not None and ipaddress.ip_address(key[0]).is_loopback


def carries_secrets(context) -> bool:
    """True for a stream over TLS with a verified client certificate, or from loopback."""
    auth = context.auth_context() or {}
    if auth.get("transport_security_type") == [b"ssl"] and auth.get("x509_pem_cert"):
        return True
    return is_loopback_peer(context.peer())
