"""How a standby scheduler names the leader when it refuses, and how agents and proxies read it.

A standby refuses changes, agent streams and route watches with
FAILED_PRECONDITION and the message ``scheduler ID is not the leader; the
leader is LEADER_ID at HOST:PORT``. Readers take the address from trailing
metadata ``leader-address`` when present, else the first HOST:PORT after the
word "leader" in the message; one definition here keeps both sides in step.
"""

from __future__ import annotations

import re

import grpc

LEADER_METADATA_KEY = "leader-address"
REFUSAL_CODES = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE)
# The first HOST:PORT after the word "leader": "... the leader is sched-b at 10.0.0.2:7000".
_LEADER_IN_TEXT = re.compile(r"leader\b.*?((?:\[[0-9a-fA-F:]+\]|[\w.\-]+):\d+)")


def leader_hint(leader_id: str, address: str) -> str:
    return f"{leader_id} at {address}"


def not_leader_message(scheduler_id: str, hint: str) -> str:
    return f"scheduler {scheduler_id} is not the leader" + (f"; the leader is {hint}" if hint else "")


def leader_named(code: grpc.StatusCode, details: str, metadata=()) -> str | None:
    """The leader address a refusing standby named (metadata first, then its message), or None."""
    if code not in REFUSAL_CODES:
        return None
    for key, value in metadata or ():
        if key == LEADER_METADATA_KEY and value:
            return value if isinstance(value, str) else value.decode()
    match = _LEADER_IN_TEXT.search(details or "")
    return match.group(1) if match else None
