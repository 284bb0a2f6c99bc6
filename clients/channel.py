"""Channel options and credentials shared by both clients."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

from meshserve.common.security.tls import TlsConfig
from meshserve.common.security.tokens import client_token

# gRPC's default 4 MiB receive limit is smaller than many tensors; -1 lifts
# the client's own limits and leaves the size policy to the server.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
)


def channel_options(extra: Iterable[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    """The defaults overlaid with the caller's options (the caller's value wins)."""
    merged = dict(DEFAULT_CHANNEL_OPTIONS)
    merged.update(dict(extra or ()))
    return list(merged.items())


def channel_credentials(credentials: grpc.ChannelCredentials | None,
                        tls: TlsConfig | None) -> grpc.ChannelCredentials | None:
    """What a client's channel uses: ``credentials`` if given, else ``tls``'s files, else the
    ``MESHSERVE_TLS_*`` environment (as every daemon reads it); None (plaintext) when none says TLS.

    The files are read now: a client created after a certificate rotation uses the new files.
    """
    if credentials is not None:
        return credentials
    return (tls if tls is not None else TlsConfig.from_env()).channel_credentials()


def bearer_token(token: str | None) -> str | None:
    """The bearer token a client sends: ``token`` if given, else ``$MESHSERVE_TOKEN``; None sends none."""
    return token or client_token()
