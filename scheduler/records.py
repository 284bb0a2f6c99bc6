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
from typing import Any, Self

from meshserve.common.states import NodeState, ReplicaState

from .spec import DeploymentSpec, SpecError, parse_deployments

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
    """A flat record as sorted JSON; unknown keys (from a newer version) are ignored on load."""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, data: bytes) -> Self:
        raw = json.loads(data)
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass(frozen=True)
class RevisionEntry:
    """One applied revision kept for rollback: its number and the spec it was applied with."""

    revision: int
    spec: DeploymentSpec
    applied_unix_ms: int = 0          # when it was applied; 0: before this was recorded

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"revision": self.revision, "spec": self.spec.to_dict(),
                                 "spec_yaml": self.spec.to_yaml()}
        if self.applied_unix_ms:   # absent when unknown: an entry written before it was recorded stays as it was
            entry["applied_unix_ms"] = self.applied_unix_ms
        return entry

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> RevisionEntry:
        """An entry as stored; one written before entries carried ``spec`` is read from its ``spec_yaml``."""
        if not isinstance(raw, dict) or isinstance(raw.get("revision"), bool) \
                or not isinstance(raw.get("revision"), int):
            raise SpecError(f"{where}: not a revision entry (revision: N, spec: {{...}})")
        applied = _whole(raw, "applied_unix_ms", 0, where)
        if "spec" in raw:
            return cls(raw["revision"], DeploymentSpec.from_dict(raw["spec"], f"{where}.spec"), applied)
        specs = parse_deployments(str(raw.get("spec_yaml") or ""))
        if len(specs) != 1:
            raise SpecError(f"{where}.spec_yaml: holds {len(specs)} deployments, not one")
        return cls(raw["revision"], specs[0], applied)


@dataclass
class DeploymentRecord:
    """A deployment's desired state: the typed spec, its revision and the revisions kept for rollback.

    Stored as JSON in the shape every earlier version wrote and reads (``spec`` as
    ``DeploymentSpec.to_dict()``, ``spec_yaml``, both fingerprints, history entries
    ``{"revision", "spec", "spec_yaml"}``), so a store can be shared across an upgrade
    either way. Loading checks the spec as strictly as ``apply`` does (``SpecError``)."""

    name: str
    spec: DeploymentSpec
    revision: int = 1
    replicas: int = 1                # desired; `scale` changes this without a new revision
    created_unix_ms: int = 0
    history: tuple[RevisionEntry, ...] = ()   # oldest first, the current revision last
    # The revision that takes the traffic the canary does not; equal to `revision` unless a
    # canary rollout is under way.
    stable_revision: int = 0
    # Autoscaled deployments (scheduler/autoscaling.py): the policy's state at its last change of
    # `replicas`, and that decision with its reason.
    autoscaler: dict[str, Any] = field(default_factory=dict)
    last_scaling: str = ""
    # The latest rollout (scheduler/rollouts.py): progressing | complete | failed: why | rolled back: why,
    # and when it began (unix ms).
    rollout_state: str = ""
    rollout_started_unix_ms: int = 0

    @property
    def spec_yaml(self) -> str:
        return self.spec.to_yaml()

    @property
    def fingerprint(self) -> str:
        """Of the whole spec: applying a spec with the same one changes nothing."""
        return self.spec.fingerprint()

    @property
    def revision_fingerprint(self) -> str:
        """Of what needs new replicas (not replicas, history or rollout)."""
        return self.spec.revision_fingerprint()

    def spec_of(self, revision: int) -> DeploymentSpec:
        """The spec a revision was applied with (the current spec if it left the history)."""
        for entry in self.history:
            if entry.revision == revision:
                return entry.spec
        return self.spec

    def entry(self, revision: int) -> RevisionEntry | None:
        return next((entry for entry in self.history if entry.revision == revision), None)

    @property
    def canary_active(self) -> bool:
        return (self.spec.rollout.strategy == "canary" and 0 < self.stable_revision != self.revision
                and self.entry(self.stable_revision) is not None)

    @property
    def canary_weight(self) -> int:
        return self.spec.rollout.canary_weight if self.canary_active else 0

    @property
    def key(self) -> str:
        return DEPLOYMENTS + self.name

    def to_json(self) -> bytes:
        return json.dumps({
            "name": self.name, "spec": self.spec.to_dict(), "spec_yaml": self.spec_yaml,
            "fingerprint": self.fingerprint, "revision_fingerprint": self.revision_fingerprint,
            "revision": self.revision, "replicas": self.replicas, "created_unix_ms": self.created_unix_ms,
            "history": [entry.to_dict() for entry in self.history], "stable_revision": self.stable_revision,
            # Only when set: a record that never autoscaled or rolled out keeps the older shape byte for byte.
            **{key: value for key, value in (
                ("autoscaler", self.autoscaler), ("last_scaling", self.last_scaling),
                ("rollout_state", self.rollout_state), ("rollout_started_unix_ms", self.rollout_started_unix_ms),
            ) if value},
        }, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> DeploymentRecord:
        """A stored record; ``SpecError`` (or ``ValueError`` for bytes that are not JSON) if it is not one."""
        raw = json.loads(data)
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise SpecError("not a deployment record (no name)")
        where = f"deployment {raw['name']!r}"
        history = raw.get("history") or []
        if not isinstance(history, list):
            raise SpecError(f"{where}.history: expected a list of revision entries")
        return cls(name=raw["name"], spec=DeploymentSpec.from_dict(raw.get("spec"), f"{where}.spec"),
                   revision=_whole(raw, "revision", 1, where), replicas=_whole(raw, "replicas", 1, where),
                   created_unix_ms=_whole(raw, "created_unix_ms", 0, where),
                   history=tuple(RevisionEntry.from_dict(entry, f"{where}.history[{i}]")
                                 for i, entry in enumerate(history)),
                   stable_revision=_whole(raw, "stable_revision", 0, where),
                   autoscaler=_mapping(raw, "autoscaler", where), last_scaling=_text(raw, "last_scaling", where),
                   rollout_state=_text(raw, "rollout_state", where),
                   rollout_started_unix_ms=_whole(raw, "rollout_started_unix_ms", 0, where))


def _text(raw: dict[str, Any], key: str, where: str) -> str:
    value = raw.get(key, "")
    if not isinstance(value, str):
        raise SpecError(f"{where}.{key}: {value!r} is not text")
    return value


def _mapping(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise SpecError(f"{where}.{key}: {value!r} is not a mapping")
    return value


def _whole(raw: dict[str, Any], key: str, default: int, where: str) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(f"{where}.{key}: {value!r} is not a whole number")
    return value


@dataclass
class ReplicaRecord(_Json):
    id: str
    deployment: str
    revision: int
    state: str = PENDING
    reason: str = ""
    node: str = ""
    gpu_indices: list[int] = field(default_factory=list)
    gpu_memory_bytes: int = 0
    address: str = ""
    pid: int = 0
    restarts: int = 0
    decision: list[str] = field(default_factory=list)   # explain lines of the last placement decision
    # Pipelines: the models this process serves (empty: the deployment's model), the step models
    # served by other replicas of its group ({model: replica id}), and the group's leader (the
    # replica serving the pipeline's own model); "" for a plain deployment's replica.
    models: list[str] = field(default_factory=list)
    remote: dict[str, str] = field(default_factory=dict)
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
    labels: dict[str, str] = field(default_factory=dict)
    gpu_source: str = "none"
    last_seen_unix_ms: int = 0

    @property
    def key(self) -> str:
        return NODES + self.name
