"""The autoscaling policy on recorded load traces, with a fake clock: no processes, no sleeping.

A trace is the offered concurrency over time (closed-loop clients keep that many calls in flight or queued
whatever the replica count). ``simulate`` samples it every second, decides every two seconds like the
scheduler, and makes the replicas the policy asks for ready after a start-up delay.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest

from meshserve.common.errors import InvalidArgument
from meshserve.scheduler.autoscaler import AutoscalerState, AutoscalingConfig, Observation, decide

START_UP_S = 5.0      # a new replica is ready this long after the policy asks for it
SAMPLE_EVERY_S = 1.0
DECIDE_EVERY_S = 2.0


def simulate(trace: Callable[[float], float], config: AutoscalingConfig, duration_s: float, *,
             start: int = 1, room: int = 1000, demand: Callable[[float], bool] = lambda t: False):
    """Run the policy over ``trace``; return [(time, desired, ready, reason)] per decision."""
    observations: list[Observation] = []
    state = AutoscalerState()
    desired, ready = start, start
    starting: list[float] = []          # ready-at times of replicas being started
    timeline = []
    now = 0.0
    while now <= duration_s:
        ready += sum(1 for at in starting if at <= now)
        starting = [at for at in starting if at > now]
        observations.append(Observation(now, trace(now), ready))
        observations = [o for o in observations if o.time >= now - config.stable_window_s]
        if now % DECIDE_EVERY_S == 0:
            placed = min(desired, room)
            pending = desired - placed
            decision, state = decide(observations, config, now, state, current=desired, pending=pending,
                                     demand=demand(now) and ready == 0)
            if decision.desired > desired:
                placeable = max(0, min(decision.desired, room) - max(ready + len(starting), 0))
                starting += [now + START_UP_S] * placeable
            elif decision.desired < desired:
                ready = min(ready, decision.desired)
                starting = starting[: max(0, decision.desired - ready)]
            desired = decision.desired
            timeline.append((now, desired, ready, decision.reason))
        now += SAMPLE_EVERY_S
    return timeline


def changes(timeline) -> int:
    return sum(1 for before, after in zip(timeline, timeline[1:], strict=False) if before[1] != after[1])


def desired_at(timeline, t: float) -> int:
    return [desired for time, desired, _, _ in timeline if time <= t][-1]


CONFIG = AutoscalingConfig(min_replicas=1, max_replicas=10, target_in_flight=2, stable_window_s=60,
                           panic_window_s=6, downscale_delay_s=30)


def test_a_step_up_reaches_the_target_and_stays():
    timeline = simulate(lambda t: 2 if t < 30 else 16, CONFIG, 300)
    assert desired_at(timeline, 28) == 1
    assert desired_at(timeline, 40) >= 4            # panic: 16 in flight is 8x one replica's target
    assert desired_at(timeline, 300) == 8           # 16 / 2
    assert max(d for _, d, _, _ in timeline) == 8   # never overshoots
    assert changes([row for row in timeline if row[0] >= 120]) == 0


def test_a_step_down_waits_for_the_delay_then_steps_down_gradually():
    timeline = simulate(lambda t: 16 if t < 100 else 2, CONFIG, 400, start=8)
    assert desired_at(timeline, 100) == 8
    assert desired_at(timeline, 125) == 8           # the stable window still remembers the load
    assert desired_at(timeline, 400) == 1
    downs = [(a[1], b[1]) for a, b in zip(timeline, timeline[1:], strict=False) if b[1] < a[1]]
    assert all(after >= before // 2 for before, after in downs)   # at most halved per decision


def test_a_short_spike_is_met_at_once_and_not_kept():
    timeline = simulate(lambda t: 40 if 60 <= t < 66 else 2, CONFIG, 400)
    assert desired_at(timeline, 58) == 1
    assert max(d for t, d, _, _ in timeline if t <= 70) >= 10      # panic takes the max right away
    assert desired_at(timeline, 400) == 1


def test_a_steady_load_does_not_flap():
    timeline = simulate(lambda t: 6, CONFIG, 600, start=3)
    assert {d for _, d, _, _ in timeline} == {3}


def test_a_noisy_load_around_a_level_does_not_flap():
    noise = random.Random(7)
    samples = {float(t): max(0.0, 8 + noise.uniform(-3, 3)) for t in range(0, 601)}
    timeline = simulate(lambda t: samples[t], CONFIG, 600, start=4)
    assert changes([row for row in timeline if row[0] >= 60]) <= 2
    assert all(3 <= d <= 6 for t, d, _, _ in timeline if t >= 60)


def test_no_room_leaves_replicas_pending_without_ratcheting_up():
    timeline = simulate(lambda t: 20, CONFIG, 200, room=3)
    assert max(d for _, d, _, _ in timeline) <= 10
    pending_reasons = [reason for _, _, _, reason in timeline if "pending" in reason]
    assert pending_reasons, "the policy must say it is waiting for pending replicas"
    # once pending, the count holds: it does not climb decision after decision
    first_pending = next(i for i, row in enumerate(timeline) if "pending" in row[3])
    assert len({row[1] for row in timeline[first_pending:]}) == 1


def test_scale_to_zero_after_the_idle_period_and_wake_on_demand():
    config = AutoscalingConfig(min_replicas=0, max_replicas=4, target_in_flight=2, stable_window_s=20,
                               panic_window_s=2, downscale_delay_s=10, scale_to_zero_after_s=30)
    timeline = simulate(lambda t: 2 if t < 20 else (0 if t < 120 else 2), config, 200,
                        demand=lambda t: t >= 120)
    assert desired_at(timeline, 18) == 1
    assert desired_at(timeline, 48) == 1           # idle, but not for 30 s beyond the window yet
    assert desired_at(timeline, 110) == 0
    woke = next(t for t, d, _, _ in timeline if t >= 120 and d >= 1)
    assert woke <= 122                              # the first decision after the held call
    assert "waking" in next(r for t, _, _, r in timeline if t == woke)


def test_min_zero_without_idle_time_keeps_one():
    config = AutoscalingConfig(min_replicas=0, max_replicas=4, scale_to_zero_after_s=300)
    timeline = simulate(lambda t: 0, config, 200)
    assert {d for _, d, _, _ in timeline} == {1}


def test_the_state_survives_a_leader_change():
    """A new leader resumes from the stored state: the same decisions as an uninterrupted run."""
    trace = lambda t: 16 if 30 <= t < 200 else 2  # noqa: E731
    observations = [Observation(float(t), trace(t), 4) for t in range(0, 300)]
    state = AutoscalerState()
    straight, resumed = [], []
    for now in range(60, 300, 2):
        window = [o for o in observations if now - 60 <= o.time <= now]
        decision, state = decide(window, CONFIG, float(now), state, current=4)
        straight.append(decision.desired)
    state = AutoscalerState()
    for now in range(60, 300, 2):
        window = [o for o in observations if now - 60 <= o.time <= now]
        state = AutoscalerState.from_json(json.loads(json.dumps(state.to_json())))   # stored and read back
        decision, state = decide(window, CONFIG, float(now), state, current=4)
        resumed.append(decision.desired)
    assert straight == resumed


def test_no_observations_keeps_the_count():
    decision, _ = decide([], CONFIG, 100.0, AutoscalerState(), current=3)
    assert decision.desired == 3 and not decision.changed


@pytest.mark.parametrize("section, message", [
    ({"min_replicas": 5, "max_replicas": 2}, "above max_replicas"),
    ({"target_in_flight": 0}, "target_in_flight"),
    ({"max_replicas": "ten"}, "must be a number"),
    ({"max_replicas": 2.5}, "whole number"),
    ({"max_replicas": True}, "must be a number"),
    ({"target_in_flight": float("nan")}, "must be a number"),
    ({"panic_window_s": 100}, "panic_window_s"),
    ({"upscale_delay": 1}, "unknown field"),
])
def test_bad_autoscaling_sections_are_refused_with_the_field_named(section, message):
    with pytest.raises(InvalidArgument, match=message):
        AutoscalingConfig.from_spec(section)


def test_defaults_round_trip_through_the_spec():
    config = AutoscalingConfig.from_spec({"min_replicas": 0, "max_replicas": 3})
    assert AutoscalingConfig.from_spec(config.to_spec()) == config
