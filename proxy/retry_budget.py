"""How many retries the proxy may spend: a share of recent calls, with a floor.

A retry is allowed while the retries of the last ``window_s`` seconds stay
under ``ratio`` of the calls of that window, or under ``min_per_window``
(so a replica dying under light traffic is still retried around). When
every replica is failing this caps the extra load retries add at
``ratio`` (20 %: what Finagle and Envoy's retry budgets default to), instead
of multiplying it by the per-call retry count. The clock is injected.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class RetryBudget:
    def __init__(self, ratio: float = 0.2, min_per_window: int = 10, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.ratio = ratio
        self.min_per_window = min_per_window
        self.window_s = window_s
        self.clock = clock
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        for times in (self._calls, self._retries):
            while times and times[0] <= horizon:
                times.popleft()

    def record_call(self) -> None:
        now = self.clock()
        self._expire(now)
        self._calls.append(now)

    def try_spend(self) -> bool:
        """True (and counted) when one more retry fits the budget."""
        now = self.clock()
        self._expire(now)
        if len(self._retries) >= max(self.min_per_window, self.ratio * len(self._calls)):
            return False
        self._retries.append(now)
        return True
