"""Replica and node states: the one vocabulary the scheduler, the node agents, ``ctl`` and the protos' string
fields share.

A replica's life as the scheduler keeps it: ``pending`` (not placed; its
reason says why) → ``placed`` (assigned to a node that has not reported it
yet) → ``starting`` → ``ready``, or ``failed``; ``draining`` when it leaves
(scaled down, replaced, its node drained); ``lost`` when it was ready and its
node stopped reporting. A node agent reports ``starting``, ``ready``,
``failed``, ``draining`` and ``stopped`` for the replicas it runs
(``AGENT_REPORTED``). StrEnum members are their strings: they compare equal
to, format as and serialise as the wire values.
"""

from __future__ import annotations

from enum import StrEnum


class ReplicaState(StrEnum):
    PENDING = "pending"
    PLACED = "placed"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"
    LOST = "lost"
    STOPPED = "stopped"


# The states a node agent reports for a replica it runs (mesh.ReplicaStatus.state).
AGENT_REPORTED = frozenset({ReplicaState.STARTING, ReplicaState.READY, ReplicaState.FAILED,
                            ReplicaState.DRAINING, ReplicaState.STOPPED})


class NodeState(StrEnum):
    READY = "ready"
    LOST = "lost"
