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

from .peer_connections import open_peers
from .shared_memory import SharedMemoryRegistry

log = logging.getLogger(__name__)

# One read of the host's socket table (a few hundred microseconds) a second, only while regions exist.
SWEEP_INTERVAL_S = 1.0


class SharedMemoryJanitor:
    def __init__(self, registry: SharedMemoryRegistry, port: int, interval_s: float = SWEEP_INTERVAL_S):
        self.registry = registry
        self.interval_s = interval_s
        registry.track_connections(lambda: open_peers(port))
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.registry.enabled and self._task is None:
            self._task = asyncio.create_task(self._sweep(), name="shared-memory-janitor")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if len(self.registry):
                try:
                    self.registry.release_closed_connections()
                except OSError as err:  # an unreadable table: keep the regions, say so once a sweep
                    log.warning("cannot read the socket table to release shared memory regions: %s", err)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
