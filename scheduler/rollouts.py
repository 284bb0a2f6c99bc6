"""How a rolling update moves, when it has failed, and going back: the rules the reconciler applies.

- ``max_surge`` / ``max_unavailable`` (Kubernetes semantics, a count or a
  percentage of the desired replicas; surge rounds up, unavailable down):
  while old revisions run, at most desired + surge replicas exist, and old
  ready replicas leave only while at least desired - unavailable stay ready.
  Defaults 1 and 0: one new replica at a time, no capacity lost.
- ``resource_aware``: when a new-revision replica is pending because no node
  has room (a surge replica on a full GPU), one old ready replica is replaced
  in place (as if max_unavailable were at least 1). Without it the rollout
  waits, and says so in an event ("stuck: no node has room ...").
- Progress: a rollout that has not finished ``progress_deadline_s`` after it
  began, or whose new revision crash-loops (a replica failed, or restarted
  ``CRASH_LOOP_RESTARTS`` times), has failed; with ``auto_rollback`` the
  deployment goes back to the previous revision, else it stays failed with
  the reason. Either way the record says so (``rollout_state``) and an
  event tells why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshserve.common.errors import FailedPrecondition

if TYPE_CHECKING:
    from .records import DeploymentRecord, ReplicaRecord
    from .spec import Rollout

CRASH_LOOP_RESTARTS = 3

PROGRESSING, COMPLETE, ROLLOUT_FAILED, ROLLED_BACK = "progressing", "complete", "failed", "rolled back"


@dataclass(frozen=True)
class RollingBounds:
    surge: int
    unavailable: int


def _resolve(value: Any, desired: int, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        exact = desired * int(value[:-1]) / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return int(value)


def rolling_bounds(rollout: Rollout, desired: int) -> RollingBounds:
    """The surge and unavailability a rolling update of ``desired`` replicas may use (never both 0)."""
    surge = _resolve(rollout.max_surge, desired, round_up=True)
    unavailable = _resolve(rollout.max_unavailable, desired, round_up=False)
    if surge == 0 and unavailable == 0:   # percentages of a small count can both round to 0
        surge = 1
    return RollingBounds(surge, unavailable)


def failure_of(rollout: Rollout, new_replicas: list[ReplicaRecord], started_unix_ms: int,
               now_unix_ms: int) -> str | None:
    """Why the rollout to the current revision has failed, or None while it may still succeed."""
    for replica in new_replicas:
        if replica.state == "failed":
            return f"replica {replica.id} of the new revision failed: {replica.reason or 'no reason given'}"
        if replica.restarts >= CRASH_LOOP_RESTARTS:
            return (f"replica {replica.id} of the new revision restarted {replica.restarts} times: "
                    f"{replica.reason or 'crash loop'}")
    deadline_s = rollout.progress_deadline_s
    if started_unix_ms and now_unix_ms - started_unix_ms > deadline_s * 1000:
        return f"not done within progress_deadline_s ({deadline_s}s)"
    return None


def rollback_changes(record: DeploymentRecord) -> tuple[dict[str, Any], int]:
    """The record changes that take ``record`` back: to its stable revision during a canary, else to the
    newest earlier revision in its history; and that revision. Raises FailedPrecondition when there is
    nothing to go back to. The spec comes from the history as it was applied (no YAML is parsed)."""
    if record.canary_active:
        target = record.stable_revision
    else:
        earlier = [entry.revision for entry in record.history if entry.revision < record.revision]
        if not earlier:
            raise FailedPrecondition(f"deployment {record.name!r} has no earlier revision in its history "
                                     f"(revision_history keeps {len(record.history)})")
        target = max(earlier)
    spec = record.spec_of(target).replace(replicas=record.replicas)
    return {"revision": target, "stable_revision": target, "spec": spec}, target
