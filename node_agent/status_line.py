"""The node agent's one-line state for ``systemctl status`` (systemd's STATUS=): which scheduler it is
registered with, and its replicas by state; while draining, how many are left."""

from __future__ import annotations

import collections

from .agent import Agent
from .replica import STOPPED


def _replicas(agent: Agent) -> str:
    counts = collections.Counter(status.state for status in agent.supervisor.statuses() if status.state != STOPPED)
    if not counts:
        return "no replicas"
    return "replicas: " + ", ".join(f"{counts[state]} {state}" for state in sorted(counts))


def agent_status(agent: Agent) -> str:
    where = (f"registered with scheduler {agent.connected_to}" if agent.connected_to
             else "not connected to a scheduler; retrying")
    return f"{where}; {_replicas(agent)}"


def draining_status(agent: Agent) -> str:
    return f"draining: {_replicas(agent)} left"
