"""``GET /metrics`` over HTTP/1.1 on asyncio: the smallest server Prometheus can scrape.

One request per connection (``Connection: close``); anything but GET
/metrics is 404. Request heads over 8 KiB or slower than 10 s are dropped,
so a stuck or hostile client cannot hold memory or a task for long.
Shared by every daemon's ``--metrics-listen`` (common/metrics.py). ``render``
may be a coroutine function (the node agent's gathers its replicas' metrics);
one that fails answers 500 with one line, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable

from meshserve.common.listen import listen_socket

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD_BYTES = 8192
READ_TIMEOUT_S = 10.0


class MetricsHttpServer:
    """Binds ``listen`` when created (``ListenError`` if the port is taken); serves from ``start()``."""

    def __init__(self, listen: str, render: Callable[[], str | Awaitable[str]]):
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
                status, body, kind = await self._metrics()
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

    async def _metrics(self) -> tuple[str, bytes, str]:
        try:
            text = self.render()
            if inspect.isawaitable(text):
                text = await text
        except Exception as err:  # a collector's bug must not end the endpoint
            log.exception("rendering /metrics failed")
            return "500 Internal Server Error", f"metrics failed: {type(err).__name__}\n".encode(), "text/plain"
        return "200 OK", str(text).encode(), CONTENT_TYPE

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        self._socket.close()
