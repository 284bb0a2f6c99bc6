"""The autoscaling policy: a pure function from load observations to a desired replica count.

``decide(observations, config, now, state) -> (Decision, state)`` reads no
clock and keeps nothing between calls except the ``AutoscalerState`` it is
given and returns, so it is tested on recorded traces with a fake clock and a
new leader resumes from the state the old one stored.

How it decides (Knative's KPA, with Ray Serve's delays):

- The load is the sum of in-flight and queued requests over a deployment's
  replicas, sampled by the scheduler from the agents' reports. It is averaged
  over a *stable* window (``stable_window_s``, 60 s) and a *panic* window
  (``panic_window_s``, 6 s).
- Wanted replicas for a window = ceil(average load / ``target_in_flight``).
- *Panic*: when the panic window wants at least ``panic_threshold`` (2×) the
  ready replicas, the policy scales up at once to the larger of the two
  windows' wants, never scales down, and stays in panic until a whole stable
  window has passed below the threshold. Bursts are met within seconds.
- Otherwise a stable load within ``tolerance`` (10%) of the current count's
  target changes nothing (Cortex's tolerance), and the stable window's want
  is applied only after it has held for
  ``upscale_delay_s`` (up) or ``downscale_delay_s`` (down): a steady load does
  not flap, and a short lull does not drop replicas.
- Each step is bounded: at most ``max_scale_up_rate`` × ready (and at least
  one more), at least ready / ``max_scale_down_rate``.
- Pending replicas (placed nowhere: no GPU has room) stop the policy from
  asking for more: the want is capped at what is wanted now until they are
  placed, so an unplaceable load does not ratchet the count up to the max.
- Scale to zero (``min_replicas: 0``): after ``scale_to_zero_after_s``
  without any load the want is 0. A call held at the proxy for a model with
  no replica (``demand``) wants 1 at once.
- The result is always clamped to [``min_replicas``, ``max_replicas``].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from meshserve.common.errors import InvalidArgument


@dataclass(frozen=True)
class AutoscalingConfig:
    """A deployment's ``autoscaling:`` section. Defaults follow Knative and Ray Serve (README, Autoscaling)."""

    min_replicas: int = 1
    max_replicas: int = 4
    target_in_flight: float = 2.0          # requests in flight or queued per replica the policy aims for
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0           # panic when the panic window wants >= this x ready replicas
    upscale_delay_s: float = 0.0           # how long a higher want must hold outside panic
    downscale_delay_s: float = 60.0        # how long a lower want must hold
    max_scale_up_rate: float = 10.0        # at most ready x this (and at least ready + 1) per decision
    max_scale_down_rate: float = 2.0       # at least ready / this per decision
    scale_to_zero_after_s: float = 120.0   # with min_replicas 0: idle this long -> 0 replicas
    tolerance: float = 0.1                 # a stable load within +-10% of the current count's target: no change

    def __post_init__(self) -> None:
        problems = []
        if self.min_replicas < 0:
            problems.append("min_replicas must be >= 0")
        if self.max_replicas < 1:
            problems.append("max_replicas must be >= 1")
        if self.min_replicas > self.max_replicas:
            problems.append(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if not self.target_in_flight > 0:
            problems.append("target_in_flight must be > 0")
        if not 0 < self.panic_window_s <= self.stable_window_s:
            problems.append("panic_window_s must be > 0 and <= stable_window_s")
        if not self.panic_threshold > 1:
            problems.append("panic_threshold must be > 1")
        if self.max_scale_up_rate <= 1 or self.max_scale_down_rate <= 1:
            problems.append("max_scale_up_rate and max_scale_down_rate must be > 1")
        if not 0 <= self.tolerance < 1:
            problems.append("tolerance must be >= 0 and < 1")
        for name in ("upscale_delay_s", "downscale_delay_s", "scale_to_zero_after_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if problems:
            raise InvalidArgument("autoscaling: " + "; ".join(problems))

    @classmethod
    def from_spec(cls, section: Mapping[str, Any]) -> AutoscalingConfig:
        """The config from a spec's ``autoscaling`` mapping; unknown keys and wrong types are refused."""
        if not isinstance(section, Mapping):
            raise InvalidArgument("autoscaling: must be a mapping")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(section) - set(known))
        if unknown:
            raise InvalidArgument(f"autoscaling: unknown field(s) {', '.join(map(str, unknown))}; "
                                  f"known: {', '.join(known)}")
        values: dict[str, Any] = {}
        for name, value in section.items():
            integer = known[name].type in ("int", int)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidArgument(f"autoscaling: {name} must be a number, not {value!r}")
            if integer and value != int(value):
                raise InvalidArgument(f"autoscaling: {name} must be a whole number, not {value!r}")
            values[name] = int(value) if integer else float(value)
        return cls(**values)

    def to_spec(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Observation:
    """One sample of a deployment's load: requests in flight and queued over its ready replicas."""

    time: float
    load: float
    ready: int


@dataclass(frozen=True)
class AutoscalerState:
    """What the policy carries from one decision to the next (stored with the deployment)."""

    desired: int = -1                  # -1: not decided yet (the first decision starts from ``current``)
    panic_until: float = 0.0           # in panic until then
    want_since: float = 0.0            # since when the stable window has wanted ``want``
    want: int = -1
    last_load_at: float = 0.0          # last time any load was seen, or the first decision (scale to zero counts
                                       # from it); 0: no decision yet
    reason: str = ""
    decided_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AutoscalerState:
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    changed: bool = False
    stable_load: float = 0.0
    panic_load: float = 0.0
    panic: bool = False
    history: tuple[str, ...] = field(default=())


def _average(observations: Sequence[Observation], since: float, now: float) -> float | None:
    window = [o.load for o in observations if since <= o.time <= now]
    return sum(window) / len(window) if window else None


def decide(observations: Sequence[Observation], config: AutoscalingConfig, now: float, state: AutoscalerState, *,
           current: int, pending: int = 0, demand: bool = False) -> tuple[Decision, AutoscalerState]:
    """The desired replica count at ``now``.

    ``current`` is the count wanted so far (the deployment's replicas), ``pending`` how many of them are not
    placed, ``demand`` whether a call is held at a proxy waiting for a replica. Guarantees: the result is in
    [min_replicas, max_replicas]; it never rises while replicas are pending; it never falls in panic; with
    no observations at all it keeps ``current`` (clamped).
    """
    previous = state.desired if state.desired >= 0 else current
    latest_ready = next((o.ready for o in reversed(observations) if o.time <= now), 0)
    stable = _average(observations, now - config.stable_window_s, now)
    panic_load = _average(observations, now - config.panic_window_s, now)
    last_load_at = state.last_load_at or now   # idleness is counted from the first decision at the latest
    if any(o.load > 0 for o in observations if now - config.panic_window_s <= o.time <= now) or demand:
        last_load_at = now
    if stable is None or panic_load is None:
        desired, reason = previous, "no load observed yet: keeping the count"
        if demand and previous == 0:
            desired, reason = 1, "a call is waiting and no replica exists: waking up"
        desired = min(max(desired, config.min_replicas), config.max_replicas)
        new_state = replace(state, desired=desired, reason=reason, decided_at=now, last_load_at=last_load_at)
        return Decision(desired, reason, desired != previous), new_state

    base = max(latest_ready, 1)
    want_stable = math.ceil(stable / config.target_in_flight - 1e-9)
    want_panic = math.ceil(panic_load / config.target_in_flight - 1e-9)
    panicking = state.panic_until > now
    if want_panic >= config.panic_threshold * base and panic_load > 0:
        panicking = True
    panic_until = now + config.stable_window_s if panicking and want_panic >= config.panic_threshold * base \
        else state.panic_until

    if previous > 0 and abs(stable / (config.target_in_flight * previous) - 1) <= config.tolerance:
        want_stable = previous   # within the tolerance of the current count: noise, not a change
    want_since, want = state.want_since, state.want
    if want_stable != want:
        want_since, want = now, want_stable

    if panicking:
        desired = max(previous, want_panic, want_stable)
        reason = (f"panic: {panic_load:.1f} in flight over {config.panic_window_s:g}s wants {want_panic} "
                  f"(>= {config.panic_threshold:g}x {base} ready)")
    elif want_stable > previous:
        if now - want_since >= config.upscale_delay_s:
            desired = want_stable
            reason = f"load {stable:.1f} in flight over {config.stable_window_s:g}s wants {want_stable}"
        else:
            desired = previous
            reason = f"load wants {want_stable}; waiting {config.upscale_delay_s:g}s upscale delay"
    elif want_stable < previous:
        if now - want_since >= config.downscale_delay_s:
            desired = want_stable
            reason = (f"load {stable:.1f} in flight over {config.stable_window_s:g}s wants {want_stable} "
                      f"for {config.downscale_delay_s:g}s")
        else:
            desired = previous
            reason = f"load wants {want_stable}; waiting {config.downscale_delay_s:g}s downscale delay"
    else:
        desired = previous
        reason = f"load {stable:.1f} in flight over {config.stable_window_s:g}s: steady at {previous}"

    # Per-step bounds, relative to what is ready now.
    step_up = max(math.ceil(base * config.max_scale_up_rate), base + 1)
    step_down = math.floor(latest_ready / config.max_scale_down_rate)
    if desired > step_up:
        desired, reason = step_up, reason + f" (step limited to {step_up})"
    if desired < previous and desired < step_down:
        desired, reason = step_down, reason + f" (step limited to {step_down})"

    if pending > 0 and desired >= previous:
        desired, reason = previous, f"{pending} replica(s) pending (no node has room): not asking for more"

    if config.min_replicas == 0:
        idle_for = now - last_load_at
        if demand and previous == 0:
            desired, reason = max(desired, 1), "a call is waiting and no replica exists: waking up"
        elif idle_for >= config.scale_to_zero_after_s and stable == 0:
            desired, reason = 0, f"idle for {idle_for:.0f}s (>= {config.scale_to_zero_after_s:g}s): scaling to zero"
        elif desired == 0:
            desired = 1 if previous > 0 else 0
    clamped = min(max(desired, config.min_replicas), config.max_replicas)
    if clamped != desired:
        reason += f" (clamped to [{config.min_replicas}, {config.max_replicas}])"
    desired = clamped
    new_state = AutoscalerState(desired=desired, panic_until=panic_until if panicking else 0.0,
                                want_since=want_since, want=want, last_load_at=last_load_at,
                                reason=reason, decided_at=now)
    return Decision(desired, reason, desired != previous, stable, panic_load, panicking), new_state
