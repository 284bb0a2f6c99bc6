"""What the scheduler keeps in the store, and where.

Layout (one prefix, so several meshes can share an etcd)::

    /meshserve/deployments/<name>   DeploymentRecord  desired state, with revision history
    /meshserve/replicas/<id>        ReplicaRecord     one replica: where it is placed and its state
    /meshserve/nodes/<name>         NodeRecord        a node as last registered, plus admin flags
    /meshserve/election/scheduler   the election key (scheduler/election.py)

Values are JSON. Live usage (per-GPU memory, utilization, in-flight) is not
written on every report: it lives in memory and is rebuilt from the next
reports after a restart. Only state changes are written.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field, fields

from meshserve.common.states import NodeState, ReplicaState

PREFIX = "/meshserve/"
DEPLOYMENTS = PREFIX + "deployments/"
REPLICAS = PREFIX + "replicas/"
NODES = PREFIX + "nodes/"

# Replica lifecycle (common/states.py). A lost replica no longer counts as one of its
# deployment's replicas (a replacement is made), but it stays routed (the proxies'
# own health checks decide whether it answers) and assigned to its node until the
# replacements are ready; then it goes. If its node returns first, it is adopted back.
PENDING, PLACED, STARTING, READY, DRAINING, FAILED, LOST = (
    ReplicaState.PENDING, ReplicaState.PLACED, ReplicaState.STARTING, ReplicaState.READY,
    ReplicaState.DRAINING, ReplicaState.FAILED, ReplicaState.LOST)
# Replicas on their way out: not counted against a deployment's desired replicas.
LEAVING = (DRAINING, LOST)
NODE_READY, NODE_LOST = NodeState.READY, NodeState.LOST


def new_replica_id(deployment: str) -> str:
    return f"{deployment}-{secrets.token_hex(3)}"


class _Json:
    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes):
        raw = json.loads(data)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass
class DeploymentRecord(_Json):
    name: str
    spec: dict                       # the validated spec, as DeploymentSpec.to_dict() gives it
    spec_yaml: str
    fingerprint: str                 # of the whole spec: "unchanged" when equal
    revision_fingerprint: str = ""   # of what needs new replicas (not replicas or history)
    revision: int = 1
    replicas: int = 1                # desired; `scale` changes this without a new revision
    created_unix_ms: int = 0
    history: list = field(default_factory=list)   # [{"revision": n, "spec": {...}, "spec_yaml": "..."}]
    # The revision that takes the traffic the canary does not; equal to `revision` unless a
    # canary rollout is under way.
    stable_revision: int = 0
    # Autoscaled deployments (scheduler/autoscaling.py): the policy's state at its last change of
    # `replicas`, and that decision with its reason.
    autoscaler: dict = field(default_factory=dict)
    last_scaling: str = ""
    # The latest rollout (scheduler/rollouts.py): progressing | complete | failed: why | rolled back: why,
    # and when it began (unix ms).
    rollout_state: str = ""
    rollout_started_unix_ms: int = 0

    def spec_of(self, revision: int) -> dict:
        """The spec a revision was applied with (the current spec if it left the history)."""
        for entry in self.history:
            if entry.get("revision") == revision and "spec" in entry:
                return entry["spec"]
        return self.spec

    @property
    def canary_active(self) -> bool:
        rollout = self.spec.get("rollout") or {}
        return (rollout.get("strategy") == "canary" and 0 < self.stable_revision != self.revision
                and any(entry.get("revision") == self.stable_revision for entry in self.history))

    @property
    def canary_weight(self) -> int:
        return int((self.spec.get("rollout") or {}).get("canary_weight", 0)) if self.canary_active else 0

    @property
    def key(self) -> str:
        return DEPLOYMENTS + self.name


@dataclass
class ReplicaRecord(_Json):
    id: str
    deployment: str
    revision: int
    state: str = PENDING
    reason: str = ""
    node: str = ""
    gpu_indices: list = field(default_factory=list)
    gpu_memory_bytes: int = 0
    address: str = ""
    pid: int = 0
    restarts: int = 0
    decision: list = field(default_factory=list)   # explain lines of the last placement decision
    # Pipelines: the models this process serves (empty: the deployment's model), the step models
    # served by other replicas of its group ({model: replica id}), and the group's leader (the
    # replica serving the pipeline's own model); "" for a plain deployment's replica.
    models: list = field(default_factory=list)
    remote: dict = field(default_factory=dict)
    group: str = ""

    @property
    def leads(self) -> bool:
        """Counts as one replica of its deployment (a pipeline's step replicas do not)."""
        return not self.group or self.group == self.id

    @property
    def key(self) -> str:
        return REPLICAS + self.id


@dataclass
class NodeRecord(_Json):
    name: str
    host: str = ""
    state: str = NODE_READY
    cordoned: bool = False
    draining: bool = False
    labels: dict = field(default_factory=dict)
    gpu_source: str = "none"
    last_seen_unix_ms: int = 0

    @property
    def key(self) -> str:
        return NODES + self.name
