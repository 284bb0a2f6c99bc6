"""A pool of model instances: each instance runs one execution at a time."""

from __future__ import annotations

import asyncio


class InstancePool:
    """Hands out free instances in FIFO order of the waiters."""

    def __init__(self, instances: list):
        self.instances = list(instances)
        self._free: asyncio.Queue = asyncio.Queue()
        for instance in self.instances:
            self._free.put_nowait(instance)

    async def acquire(self):
        return await self._free.get()

    def release(self, instance) -> None:
        self._free.put_nowait(instance)

    @property
    def busy(self) -> int:
        return len(self.instances) - self._free.qsize()
