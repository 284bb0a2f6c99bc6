"""protos/backoff.py: the one retry schedule, capped and jittered (issue 8 item 2)."""

from __future__ import annotations

import random

import pytest

from meshserve.common.backoff import Backoff
from meshserve.node_agent.agent import RECONNECT_BACKOFF
from meshserve.scheduler.core import DEFAULT_HEARTBEAT_TIMEOUT_S


def test_without_jitter_the_schedule_is_exact_as_before():
    backoff = Backoff(initial_s=0.5, max_s=4.0)
    assert [backoff.delay(n) for n in range(0, 7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_jitter_spreads_delays_within_its_fraction_and_never_past_the_cap():
    backoff = Backoff(initial_s=0.2, max_s=2.0, jitter=0.5, rng=random.Random(7))
    delays = [backoff.delay(10) for _ in range(1000)]
    assert all(1.0 <= delay <= 2.0 for delay in delays)
    assert len({round(delay, 3) for delay in delays}) > 100          # spread, not a few instants
    assert min(delays) < 1.1 and max(delays) > 1.9
    full = Backoff(initial_s=1.0, max_s=1.0, jitter=1.0, rng=random.Random(7))
    assert all(0.0 <= full.delay(3) <= 1.0 for _ in range(100))


def test_a_seeded_source_makes_jitter_reproducible():
    first = Backoff(jitter=0.5, rng=random.Random(42))
    second = Backoff(jitter=0.5, rng=random.Random(42))
    assert [first.delay(n) for n in range(1, 20)] == [second.delay(n) for n in range(1, 20)]


def test_jitter_outside_0_to_1_is_refused():
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=1.5)


def test_agents_reconnect_jittered_and_sooner_than_a_heartbeat_timeout():
    assert RECONNECT_BACKOFF.jitter > 0
    assert RECONNECT_BACKOFF.delay(1000) <= RECONNECT_BACKOFF.max_s < DEFAULT_HEARTBEAT_TIMEOUT_S
