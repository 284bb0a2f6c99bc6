"""Exponential backoff, capped: the one retry schedule of the daemons (agent restarts and reconnects,
the proxy's route watch and health re-checks)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """``delay(n)`` for the n-th consecutive failure (n >= 1): ``initial_s * factor**(n-1)``, at most ``max_s``.

    Defaults (the agent's replica restarts): a crash-looping replica is
    retried after 0.5 s, 1 s, 2 s, ... and then every 30 s, so a broken model
    costs little CPU yet recovers within half a minute once its cause (a full
    GPU, a missing file) is gone. Other users pass their own schedule.
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0

    def delay(self, failures: int) -> float:
        if failures < 1:
            return 0.0
        # Cap the exponent first: factor**n overflows a float long before a host stops retrying.
        exponent = min(failures - 1, 64)
        return min(self.max_s, self.initial_s * self.factor**exponent)
