"""Releasing the shared memory regions of clients that have gone.

grpc-python tells a servicer nothing when a connection closes, so once a
second this task asks the kernel which connections to the runtime's port
are still open (``runtime.peer_connections``) and unregisters the regions
registered over any other (``SharedMemoryRegistry.release_closed_connections``).
A region therefore outlives its client's connection by at most
``SWEEP_INTERVAL_S`` (and not at all when a quota is reached: registering
sweeps first). Where the socket table cannot be read (not Linux) regions stay
until unregistered, bounded by the registry's quotas.
"""

from __future__ import annotations

import asyncio
import logging

from meshserve.common.peer_connections import open_peers

from .shared_memory import SharedMemoryRegistry

log = logging.getLogger(__name__)

# One read of the host's socket table (a few hundred microseconds) a second, only while regions exist.
SWEEP_INTERVAL_S = 1.0


class SharedMemoryJanitor:
    def __init__(self, registry: SharedMemoryRegistry, port: int, interval_s: float = SWEEP_INTERVAL_S):
        self.registry = registry
        self.interval_s = interval_s
        registry.track_connections(lambda: open_peers(port))
        # A timer, not a task: a server stopped without stop() (tests) leaves nothing pending behind.
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self.registry.enabled and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._sweep)

    def _sweep(self) -> None:
        if len(self.registry):
            try:
                self.registry.release_closed_connections()
            except OSError as err:  # an unreadable table: keep the regions, say so once a sweep
                log.warning("cannot read the socket table to release shared memory regions: %s", err)
        self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._sweep)

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
