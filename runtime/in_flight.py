"""The inference calls a runtime is serving right now, so that a drain waits for them and nothing else.

gRPC's graceful stop waits for every open call, and a proxy's or an agent's
``grpc.health.v1`` Watch stream never ends by itself: a draining replica used
to sit out its whole grace period even when idle. The runtime counts its
inference calls (``ModelInfer``, and each ``ModelStreamInfer`` stream while it
is open) and stops as soon as none is left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class InFlight:
    """A count of calls in progress; ``with in_flight:`` around each. Loop-bound, not thread-safe."""

    def __init__(self):
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> InFlight:
        self.count += 1
        self._idle.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    @contextlib.contextmanager
    def call(self, context: object) -> Iterator[None]:
        """Count one call from now until its RPC is over: after its response has gone out, not when the
        handler returns (a stop right then would cancel the response on the wire). A handler that raises,
        or a context without done callbacks (a test calling the servicer), stops counting at its return."""
        self.__enter__()
        handed_off = False
        try:
            yield
            add_done_callback = getattr(context, "add_done_callback", None)
            if add_done_callback is not None:
                add_done_callback(lambda _context: self.__exit__())
                handed_off = True
        finally:
            if not handed_off:
                self.__exit__()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no call is in progress; False if ``timeout`` seconds pass first."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True
