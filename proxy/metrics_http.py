"""``GET /metrics`` over HTTP/1.1 on asyncio: the smallest server Prometheus can scrape.

One request per connection (``Connection: close``); anything but GET
/metrics is 404. Request heads over 8 KiB or slower than 10 s are dropped,
so a stuck or hostile client cannot hold memory or a task for long.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from meshserve.common.listen import listen_socket

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD_BYTES = 8192
READ_TIMEOUT_S = 10.0


class MetricsHttpServer:
    """Binds ``listen`` when created (``ListenError`` if the port is taken); serves from ``start()``."""

    def __init__(self, listen: str, render: Callable[[], str]):
        self.listen = listen
        self.render = render
        self.server: asyncio.AbstractServer | None = None
        self._socket = listen_socket(listen)
        self.address = f"{listen.rsplit(':', 1)[0]}:{self._socket.getsockname()[1]}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, sock=self._socket, limit=MAX_HEAD_BYTES)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method in ("GET", "HEAD") and path == "/metrics":
                status, body, kind = "200 OK", self.render().encode(), CONTENT_TYPE
            else:
                status, body, kind = "404 Not Found", b"not found: try GET /metrics\n", "text/plain"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        self._socket.close()
