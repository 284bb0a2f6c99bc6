"""Which clients still hold a TCP connection to this server: read from the kernel's socket table.

grpc-python has no hook for a connection closing (a servicer sees calls, not
connections), yet state a client leaves on a server (shared memory regions)
must go when the client does. The kernel knows: ``/proc/net/tcp`` and
``/proc/net/tcp6`` list every socket with its local and remote address and
state. A client's connection is open while a socket on the server's port
to the client's address (``context.peer()``) is ESTABLISHED; once the client
closes it, the socket leaves that state (CLOSE_WAIT, then gone).

Guarantees: ``open_peers(port)`` is the set of remote (address, port) pairs
of ESTABLISHED connections to local ``port``, IPv4-mapped IPv6 addresses
given as IPv4 (as gRPC names such peers); ``None`` where the table cannot be
read (not Linux). ``peer_key`` turns a gRPC peer string into the same form,
or None for a peer that is not TCP. Reading the table is one pass over the
host's sockets: call it every second or so, not per request.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import unquote

TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
ESTABLISHED = "01"  # include/net/tcp_states.h TCP_ESTABLISHED, as /proc/net/tcp prints it

PeerKey = tuple[str, int]


def _address(hex_address: str) -> str:
    """An address as /proc/net/tcp prints it (32-bit words in host, little-endian, order)."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def _endpoint(text: str) -> PeerKey:
    hex_address, hex_port = text.split(":")
    return _address(hex_address), int(hex_port, 16)


def open_peers(local_port: int, tables=TABLES) -> frozenset[PeerKey] | None:
    """The (address, port) of every client with an ESTABLISHED connection to ``local_port``."""
    peers = set()
    read_any = False
    for table in tables:
        try:
            with open(table, encoding="ascii") as lines:
                next(lines, None)  # the header
                read_any = True
                for line in lines:
                    fields = line.split()
                    if len(fields) < 4 or fields[3] != ESTABLISHED:
                        continue
                    local = _endpoint(fields[1])
                    if local[1] == local_port:
                        peers.add(_endpoint(fields[2]))
        except FileNotFoundError:
            continue
    return frozenset(peers) if read_any else None


def peer_key(peer: str) -> PeerKey | None:
    """``"ipv4:127.0.0.1:5000"`` or ``"ipv6:[::1]:5000"`` (``%5B::1%5D`` too) -> ("127.0.0.1", 5000)."""
    scheme, _, rest = peer.partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return None
    host, _, port = unquote(rest).rpartition(":")
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
        number = int(port)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), number
