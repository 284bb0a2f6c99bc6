"""Exponential backoff, capped and optionally jittered: the one retry schedule of the daemons (agent
restarts and reconnects, the proxy's route watch and health re-checks)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """``delay(n)`` for the n-th consecutive failure (n >= 1): ``initial_s * factor**(n-1)``, at most ``max_s``,
    then shortened by a random fraction of at most ``jitter`` of itself.

    Defaults (the agent's replica restarts): a crash-looping replica is
    retried after 0.5 s, 1 s, 2 s, ... and then every 30 s, so a broken model
    costs little CPU yet recovers within half a minute once its cause (a full
    GPU, a missing file) is gone. Other users pass their own schedule.

    ``jitter`` (0..1) spreads clients that failed together (every agent of a
    restarted scheduler) so they do not all retry at the same instants: the
    delay is uniform in ``[base * (1 - jitter), base]``; 1 is "full jitter",
    0.5 "equal jitter", 0 (the default) none. Jitter only ever shortens a
    delay, so ``max_s`` stays a hard cap. ``rng`` makes it reproducible in
    tests (default: the module's shared random source).
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.0
    rng: random.Random | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"Backoff.jitter must be within 0..1, not {self.jitter}")

    def delay(self, failures: int) -> float:
        if failures < 1:
            return 0.0
        # Cap the exponent first: factor**n overflows a float long before a host stops retrying.
        exponent = min(failures - 1, 64)
        base = min(self.max_s, self.initial_s * self.factor**exponent)
        if not self.jitter:
            return base
        return base * (1.0 - self.jitter * (self.rng or random).random())
