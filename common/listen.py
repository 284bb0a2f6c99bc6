"""Every listener of every daemon is created here: a port in use is an error, never shared.

gRPC servers set ``SO_REUSEPORT`` by default, so a second process on the same
port starts without a word and the kernel splits new connections between the
two (a rogue ``scheduler serve`` next to the real one answered a quarter of
the admin calls). Guarantees of this module:

- ``grpc_server`` is the only way a daemon creates a gRPC server; it always
  turns ``grpc.so_reuseport`` off, whatever other options are passed.
- ``bind`` adds the listening port; on failure it raises ``ListenError``
  naming the address and the kernel's reason ("already in use").
- ``listen_socket`` is the same for plain TCP listeners (HTTP endpoints): a
  bound, listening socket without ``SO_REUSEPORT``.

A daemon's entry point catches ``ListenError`` and exits non-zero with its
message (``exit_on_listen_error``), before it has touched anything else.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Sequence

import grpc

# The one option that matters here: without it a port in use is silently shared.
NO_PORT_SHARING = ("grpc.so_reuseport", 0)
# Connections waiting to be accepted by an HTTP endpoint; what the kernel's default somaxconn was for years.
LISTEN_BACKLOG = 128


class ListenError(OSError):
    """A listener could not be created; the message names the address and why."""


def grpc_server(*, interceptors: Sequence = (), options: Sequence[tuple[str, object]] = (),
                **kwargs) -> grpc.aio.Server:
    """A ``grpc.aio.server`` that refuses to share its port (``options`` may not turn that back on)."""
    kept = [option for option in options if option[0] != NO_PORT_SHARING[0]]
    return grpc.aio.server(interceptors=list(interceptors), options=[*kept, NO_PORT_SHARING], **kwargs)


def split_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``[::1]:80`` too) -> (host without brackets, port); ``ListenError`` if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ListenError(f"cannot listen on {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _why_not(address: str) -> str:
    """The kernel's reason a bind of ``address`` fails now (gRPC's own error does not say)."""
    try:
        with listen_socket(address):
            return f"cannot listen on {address}: gRPC could not bind it"
    except ListenError as err:
        return str(err)


def bind(server: grpc.Server | grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> str:
    """Listen on ``address`` (port 0 picks a free one); returns ``HOST:PORT`` with the port bound.

    Raises ``ListenError`` (e.g. "cannot listen on 127.0.0.1:7070: address already in use").
    """
    split_address(address)
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError:  # grpcio >= 1.5x raises "Failed to bind to address ..."
        port = 0
    if not port:
        raise ListenError(_why_not(address))
    return f"{address.rsplit(':', 1)[0]}:{port}"


def listen_socket(address: str) -> socket.socket:
    """A TCP socket bound to ``address`` and listening, without ``SO_REUSEPORT``; the caller owns it.

    ``SO_REUSEADDR`` stays on (as asyncio and gRPC set it): on Linux it only
    allows rebinding over connections in TIME_WAIT, never over a listener.
    """
    host, port = split_address(address)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ListenError(f"cannot listen on {address}: {err.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
    except OSError as err:
        sock.close()
        reason = "address already in use" if err.errno == errno.EADDRINUSE else err.strerror
        raise ListenError(f"cannot listen on {address}: {reason}") from None
    sock.setblocking(False)
    return sock


def exit_on_listen_error(daemon: str, error: ListenError) -> None:
    """What every daemon does when a listener fails: one line on stderr, exit status 1."""
    print(f"{daemon}: {error}", file=sys.stderr, flush=True)
    raise SystemExit(1)
