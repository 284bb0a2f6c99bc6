"""Admission control for one replica: a bounded number of calls at once, a bounded queue behind them.

Guarantees:
- At most ``limit`` calls run on the replica at once through this proxy.
- Up to ``max_queued`` more wait, first come first served, each no longer
  than its own deadline (DEADLINE_EXCEEDED naming the wait), holding at most
  ``max_queued_bytes`` of requests between them (one request always may wait).
- A call beyond that is refused at once with RESOURCE_EXHAUSTED naming the
  replica and its load: a clear, retryable answer, instead of piling calls
  onto a replica whose gRPC server then sheds them as a bare CANCELLED.
- A slot is released exactly once, when its call ends however it ends
  (cancelled while waiting included).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from meshserve.common.errors import DeadlineExceeded, ResourceExhausted


@dataclass
class _Waiter:
    future: asyncio.Future
    size: int


class Admission:
    def __init__(self, limit: int, max_queued: int, max_queued_bytes: int):
        self.limit = limit
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self.running = 0
        self.queued_bytes = 0
        self._queue: deque[_Waiter] = deque()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def acquire(self, timeout: float | None, size: int, what: str) -> None:
        """Take a slot for a call of ``size`` request bytes to ``what`` (a replica, named in errors)."""
        if self.running < self.limit and not self._queue:
            self.running += 1
            return
        if self._queue and (len(self._queue) >= self.max_queued
                            or self.queued_bytes + size > self.max_queued_bytes):
            raise ResourceExhausted(
                f"{what} is at capacity: {self.running} calls running, {len(self._queue)} waiting "
                f"({self.queued_bytes} bytes); retry later")
        waiter = _Waiter(asyncio.get_running_loop().create_future(), size)
        self._queue.append(waiter)
        self.queued_bytes += size
        try:
            await asyncio.wait_for(waiter.future, timeout)
        except BaseException as err:     # the deadline, or the call cancelled while it waited
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()           # handed a slot just as the wait ended: pass it on
            else:
                self._forget(waiter)
            if isinstance(err, asyncio.TimeoutError):
                raise DeadlineExceeded(f"deadline exceeded waiting for {what}: {self.running} calls "
                                       f"running, {len(self._queue)} waiting") from None
            raise

    def release(self) -> None:
        """End a call's slot: the first waiter still waiting gets it."""
        while self._queue:
            waiter = self._queue.popleft()
            self.queued_bytes -= waiter.size
            if not waiter.future.done():
                waiter.future.set_result(None)   # the slot passes on: ``running`` is unchanged
                return
        self.running -= 1

    def _forget(self, waiter: _Waiter) -> None:
        try:
            self._queue.remove(waiter)
        except ValueError:
            return
        self.queued_bytes -= waiter.size

