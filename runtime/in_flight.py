"""The inference calls a runtime is serving right now, so that a drain waits for them and nothing else.

gRPC's graceful stop waits for every open call, and a proxy's or an agent's
``grpc.health.v1`` Watch stream never ends by itself: a draining replica used
to sit out its whole grace period even when idle. The runtime counts its
inference calls (``ModelInfer``, and each ``ModelStreamInfer`` stream while it
is open) and stops as soon as none is left.
"""

from __future__ import annotations

import asyncio


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

    def __exit__(self, *exc) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no call is in progress; False if ``timeout`` seconds pass first."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True
