"""Exponential backoff, capped: the proxy's retry schedule for reconnects and health re-checks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """``delay(n)`` for the n-th consecutive failure (n >= 1): ``initial_s * factor**(n-1)``, at most ``max_s``."""

    initial_s: float = 0.1
    max_s: float = 5.0
    factor: float = 2.0

    def delay(self, failures: int) -> float:
        if failures < 1:
            return 0.0
        return min(self.max_s, self.initial_s * self.factor ** min(failures - 1, 64))
