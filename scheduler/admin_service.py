"""``mesh.AdminService``: what ``scheduler ctl`` calls. Changes are leader-only and fenced."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc

from .artifacts import BlobStore
from .core import SchedulerCore
from .model_files import check_visible_models
from .placing import replica_needs
from .records import NODE_LOST, PENDING, READY, DeploymentRecord, NodeRecord, RevisionEntry
from .rollouts import PROGRESSING, ROLLED_BACK, rollback_changes
from .spec import SOURCE_UPLOAD, URL_SCHEMES, DeploymentSpec, parse_deployments

KINDS = ("nodes", "deployments", "replicas")
_SINGULAR = {"node": "nodes", "deployment": "deployments", "replica": "replicas"}
# Replica ids named in a refusal: enough to recognise them, bounded for a node with hundreds.
NAMES_SHOWN = 5
# ReplicaLogs: defaults and ceilings, whatever a request asks (node_agent/log_requests.py bounds them again).
LOGS_TAIL_LINES, LOGS_MAX_TAIL_LINES = 100, 10_000
LOGS_MAX_BYTES, LOGS_MAX_MAX_BYTES = 1 << 20, 16 << 20
LOGS_FOLLOW_S, LOGS_MAX_FOLLOW_S = 3600, 24 * 3600
# An agent answers a LogsRequest at once; one that does not within this predates it or is stuck.
LOGS_FIRST_CHUNK_TIMEOUT_S = 10.0


def _kind(kind: str) -> str:
    normalized = _SINGULAR.get(kind, kind)
    if normalized not in KINDS:
        raise InvalidArgument(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    return normalized


class AdminService(mesh_grpc.AdminServiceServicer):
    def __init__(self, core: SchedulerCore, leader_info, blobs: BlobStore | None = None):
        self.core = core
        self._leader_info = leader_info  # async () -> (is_leader, leader_id, leader_address)
        self.blobs = blobs               # uploaded bundles; None: model.source upload is refused

    async def _check_sources(self, specs) -> None:
        """Refuse a spec whose model bundle this scheduler cannot hand to agents."""
        for spec in specs:
            model = spec.model
            if model.source.startswith(URL_SCHEMES) and not model.digest:
                raise InvalidArgument(f"deployment/{spec.name}: model.source {model.source} needs model.digest "
                                      f"(`scheduler ctl apply` fetches the source once and computes it)")
            if model.source != SOURCE_UPLOAD:
                continue
            if not model.digest:
                raise InvalidArgument(f"deployment/{spec.name}: model.source upload needs model.digest "
                                      f"(`scheduler ctl apply` computes it and uploads the folder)")
            if self.blobs is None or await asyncio.to_thread(self.blobs.size, model.digest) is None:
                raise FailedPrecondition(f"deployment/{spec.name}: the scheduler holds no bundle {model.digest}; "
                                         f"apply with `scheduler ctl apply`, which uploads it")

    @property
    def cluster(self):
        return self.core.cluster

    async def _commit(self, record: DeploymentRecord | NodeRecord, **changes) -> DeploymentRecord | NodeRecord:
        """``record`` with ``changes``, written; memory takes it only once the store has, so a call
        that fails (the store unavailable, leadership lost) has changed nothing."""
        updated = dataclasses.replace(record, **changes)
        await self.core.writer.put(updated)
        target = self.cluster.deployments if isinstance(updated, DeploymentRecord) else self.cluster.nodes
        target[updated.name] = updated
        return updated

    async def Leader(self, request, context):
        is_leader, leader_id, address = await self._leader_info()
        return mesh.LeaderResponse(is_leader=is_leader, leader_id=leader_id, leader_address=address)

    async def Apply(self, request, context):
        specs = parse_deployments(request.spec_yaml)  # bad input is refused on any scheduler
        await check_visible_models(specs)              # and so is a model whose files it sees are wrong
        self.core.require_leader()
        await self._check_sources(specs)
        applied = []
        for spec in specs:
            record = self.cluster.deployments.get(spec.name)
            fingerprint = spec.fingerprint()
            if record is not None and record.fingerprint == fingerprint:
                applied.append(f"deployment/{spec.name} unchanged")
                continue
            verb = "created" if record is None else "configured"
            if request.dry_run:
                applied.append(f"deployment/{spec.name} {verb} (dry run)")
                continue
            if record is not None and record.revision_fingerprint == spec.revision_fingerprint():
                replicas = _replicas_after_apply(record, spec)
                await self._commit(record, replicas=replicas, spec=spec)  # a scale: no new revision
                self.cluster.record_event(f"deployment/{spec.name}", f"configured: {replicas} replica(s)")
                applied.append(f"deployment/{spec.name} configured")
                continue
            new = self._next_record(record, spec)
            await self.core.writer.put(new)
            self.cluster.deployments[spec.name] = new
            self.cluster.record_event(f"deployment/{spec.name}", f"{verb}: revision {new.revision}, "
                                      f"{new.replicas} replica(s)")
            applied.append(f"deployment/{spec.name} {verb}")
        self.core.poke()
        return mesh.ApplyResponse(applied=applied)

    @staticmethod
    def _next_record(record: DeploymentRecord | None, spec: DeploymentSpec) -> DeploymentRecord:
        """The record after applying a spec that needs a new revision."""
        now = time.time_ns() // 1_000_000
        # Never a number used before: after a rollback the current revision is not the newest, and a
        # reused number would make spec_of() answer with the older revision's spec (and model bytes).
        revision = max([record.revision, *(entry.revision for entry in record.history)]) + 1 if record else 1
        keep = max(1, spec.revision_history)
        history = ((record.history if record else ()) + (RevisionEntry(revision, spec, now),))[-keep:]
        if record is not None and spec.rollout.strategy == "canary":
            # The revision that served before stays stable (through a chain of canaries, the first).
            stable = record.stable_revision if record.canary_active else record.revision
        else:
            stable = revision
        return DeploymentRecord(
            name=spec.name, spec=spec, revision=revision, replicas=_replicas_after_apply(record, spec),
            created_unix_ms=record.created_unix_ms if record else now, history=history, stable_revision=stable,
            autoscaler=record.autoscaler if record else {}, last_scaling=record.last_scaling if record else "",
            rollout_state=PROGRESSING, rollout_started_unix_ms=now)

    def _deployment_record(self, name: str) -> DeploymentRecord:
        record = self.cluster.deployments.get(name)
        if record is None:
            raise NotFound(f"no deployment named {name!r}")
        return record

    async def ReplicaLogs(self, request, context):
        """The replica's kept output, from the agent of the node it is placed on (scheduler/log_relay.py)."""
        self.core.require_leader()
        if not request.replica:
            raise InvalidArgument("ReplicaLogs needs a replica id")
        replica = self.cluster.replicas.get(request.replica)
        if replica is None:
            raise NotFound(f"no replica named {request.replica[:200]!r}")
        if not replica.node:
            raise FailedPrecondition(f"replica {replica.id} is not placed on a node yet: it has no output")
        channel = self.core.channel_of(replica.node)
        if channel is None:
            raise Unavailable(f"the agent of node {replica.node} (replica {replica.id}) is not connected")
        ask = mesh.LogsRequest(
            replica_id=replica.id, follow=request.follow,
            tail_lines=min(request.tail_lines or LOGS_TAIL_LINES, LOGS_MAX_TAIL_LINES),
            max_bytes=min(request.max_bytes or LOGS_MAX_BYTES, LOGS_MAX_MAX_BYTES),
            follow_seconds=min(request.follow_seconds or LOGS_FOLLOW_S, LOGS_MAX_FOLLOW_S))
        loop = asyncio.get_running_loop()
        # Following ends on the agent's side; a silent agent is not waited for past that end.
        follow_until = loop.time() + ask.follow_seconds + LOGS_FIRST_CHUNK_TIMEOUT_S
        with self.core.log_relay.request(replica.node, channel, ask) as chunks:
            first = True
            while True:
                following = ask.follow and not first
                wait_s = max(0.0, follow_until - loop.time()) if following else LOGS_FIRST_CHUNK_TIMEOUT_S
                try:
                    async with asyncio.timeout(wait_s):
                        chunk = await chunks.get()
                except TimeoutError:
                    if following:
                        return
                    raise Unavailable(f"the agent of node {replica.node} did not answer within "
                                      f"{LOGS_FIRST_CHUNK_TIMEOUT_S:g}s (an agent older than ReplicaLogs?)") from None
                first = False
                if chunk is None:
                    raise Unavailable(f"the agent of node {replica.node} disconnected")
                if chunk.lines:
                    yield mesh.ReplicaLogsChunk(lines=chunk.lines)
                if chunk.error:
                    raise FailedPrecondition(f"node {replica.node}: {chunk.error}")
                if chunk.end:
                    return

    async def Promote(self, request, context):
        self.core.require_leader()
        record = self._deployment_record(request.name)
        if not record.canary_active:
            raise FailedPrecondition(f"deployment {request.name!r} has no canary to promote "
                                     f"(revision {record.revision} serves all traffic)")
        stable = record.stable_revision
        record = await self._commit(record, stable_revision=record.revision)
        message = f"revision {record.revision} promoted: it replaces revision {stable} replica by replica"
        self.cluster.record_event(f"deployment/{request.name}", message)
        self.core.poke()
        return mesh.RolloutResponse(revision=record.revision, message=message)

    async def Rollback(self, request, context):
        self.core.require_leader()
        record = self._deployment_record(request.name)
        changes, target = rollback_changes(record)
        previous = record.revision
        await self._commit(record, **changes, rollout_state=f"{ROLLED_BACK}: by request",
                           rollout_started_unix_ms=int(time.time() * 1000))
        message = f"rolled back from revision {previous} to revision {target}"
        self.cluster.record_event(f"deployment/{request.name}", message)
        self.core.poke()
        return mesh.RolloutResponse(revision=target, message=message)

    async def Get(self, request, context):
        return self._get(_kind(request.kind), request.name)

    def _get(self, kind: str, name: str) -> mesh.GetResponse:
        response = mesh.GetResponse()
        cluster = self.cluster
        if kind == "nodes":
            names = [name] if name else sorted(cluster.nodes)
            for node_name in names:
                response.nodes.append(self._node(node_name))
        elif kind == "deployments":
            names = [name] if name else sorted(cluster.deployments)
            for deployment_name in names:
                response.deployments.append(self._deployment(deployment_name))
        else:
            replicas = sorted(cluster.replicas.values(), key=lambda r: (r.deployment, r.id))
            if name:
                replicas = [r for r in replicas if name in (r.id, r.deployment)]
                if not replicas:
                    raise NotFound(f"no replica or deployment named {name!r}")
            for replica in replicas:
                response.replicas.append(mesh.Replica(
                    id=replica.id, deployment=replica.deployment, node=replica.node,
                    gpu_indices=replica.gpu_indices, address=replica.address, pid=replica.pid,
                    state=replica.state, reason=replica.reason, restarts=replica.restarts,
                    revision=replica.revision, gpu_memory_bytes=replica.gpu_memory_bytes))
        return response

    def _node(self, name: str) -> mesh.Node:
        record = self.cluster.nodes.get(name)
        if record is None:
            raise NotFound(f"no node named {name!r}")
        live = self.cluster.live.get(name)
        node = mesh.Node(name=name, host=record.host, state=record.state, cordoned=record.cordoned,
                         draining=record.draining, labels=record.labels, gpu_source=record.gpu_source,
                         last_seen_unix_ms=record.last_seen_unix_ms,
                         replicas=len(self.cluster.replicas_on(name)))
        booked = [replica_needs(self.cluster, r) for r in self.cluster.replicas_on(name) if r.state != PENDING]
        node.cpu_allocated = sum(needs.cpu for needs in booked)
        node.memory_allocated_bytes = sum(needs.memory for needs in booked)
        node.gpu_memory_allocated_bytes = sum(needs.gpu_memory * max(needs.gpus, 0) for needs in booked)
        if live:
            node.gpus.extend(live.gpus)
            node.resources.CopyFrom(live.resources)
        return node

    def _deployment(self, name: str) -> mesh.Deployment:
        record = self.cluster.deployments.get(name)
        if record is None:
            raise NotFound(f"no deployment named {name!r}")
        return mesh.Deployment(
            name=name, spec_yaml=record.spec_yaml, replicas=record.replicas,
            ready_replicas=self.cluster.ready_count(name),
            revision=record.revision, model=record.spec.model.name, created_unix_ms=record.created_unix_ms,
            revision_history=[entry.revision for entry in record.history],
            stable_revision=record.stable_revision or record.revision, canary_weight=record.canary_weight,
            rollout_state=record.rollout_state, rollout_started_unix_ms=record.rollout_started_unix_ms,
            revisions=_revisions(record), model_digest=record.spec.model.digest,
            revision_digests=[entry.spec.model.digest for entry in record.history], **_autoscaling_fields(record))

    async def Describe(self, request, context):
        kind = _kind(request.kind)
        obj = self._get(kind, request.name)
        subject = f"{kind[:-1]}/{request.name}"
        return mesh.DescribeResponse(object=obj, events=list(self.cluster.events.get(subject, [])))

    async def Delete(self, request, context):
        self.core.require_leader()
        if _kind(request.kind) != "deployments":
            raise InvalidArgument(f"only deployments can be deleted, not {request.kind!r}")
        record = self.cluster.deployments.get(request.name)
        if record is None:
            raise NotFound(f"no deployment named {request.name!r}")
        await self.core.writer.delete(record)
        del self.cluster.deployments[request.name]
        self.cluster.record_event(f"deployment/{request.name}", "deleted")
        self.core.poke()
        return mesh.DeleteResponse()

    async def Scale(self, request, context):
        self.core.require_leader()
        record = self.cluster.deployments.get(request.name)
        if record is None:
            raise NotFound(f"no deployment named {request.name!r}")
        if record.replicas != request.replicas:
            await self._commit(record, replicas=request.replicas)
            self.cluster.record_event(f"deployment/{request.name}", f"scaled to {request.replicas}")
            self.core.poke()
        return mesh.ScaleResponse()

    async def _set_node_flags(self, name: str, **flags) -> None:
        self.core.require_leader()
        record = self.cluster.nodes.get(name)
        if record is None:
            raise NotFound(f"no node named {name!r}")
        await self._commit(record, **flags)
        self.cluster.record_event(f"node/{name}", ", ".join(f"{k}={v}" for k, v in flags.items()))
        self.core.poke()

    async def Cordon(self, request, context):
        await self._set_node_flags(request.name, cordoned=True)
        return mesh.NodeResponse()

    async def Uncordon(self, request, context):
        await self._set_node_flags(request.name, cordoned=False, draining=False)
        return mesh.NodeResponse()

    async def Drain(self, request, context):
        self.core.require_leader()
        stranded = self._stranded_by_drain(request.name)
        if stranded and not request.force:
            raise FailedPrecondition(
                f"draining {request.name} would leave {', '.join(stranded)} with no ready replica elsewhere "
                f"(an outage until replacements are ready); drain with --force to do it anyway")
        await self._set_node_flags(request.name, cordoned=True, draining=True)
        if stranded:
            self.cluster.record_event(f"node/{request.name}", f"drained with --force: {', '.join(stranded)} "
                                                              f"had no ready replica elsewhere")
        return mesh.NodeResponse()

    def _stranded_by_drain(self, node: str) -> list[str]:
        """Deployments whose every ready replica is on ``node``."""
        stranded = []
        for name in sorted(self.cluster.deployments):
            ready = [r for r in self.cluster.replicas_of(name) if r.state == READY]
            if ready and all(r.node == node for r in ready):
                stranded.append(f"deployment/{name}")
        return stranded

    async def DeleteNode(self, request, context):
        """Forget a node that is gone for good. Without ``force`` only a node that holds no
        replica and whose agent does not report (never connected, stream closed, or lost)."""
        self.core.require_leader()
        name = request.name
        record = self.cluster.nodes.get(name)
        if record is None:
            raise NotFound(f"no node named {name!r}")
        held = [replica.id for replica in self.cluster.replicas_on(name)]
        live = self.cluster.live.get(name)
        if not request.force:
            if live is not None and live.connected and record.state != NODE_LOST:
                raise FailedPrecondition(f"node {name!r} is connected: its agent still reports; stop the agent "
                                         f"first, or force (its agent would register again as a new node)")
            if held:
                shown = ", ".join(held[:NAMES_SHOWN]) + (", ..." if len(held) > NAMES_SHOWN else "")
                raise FailedPrecondition(f"node {name!r} holds {len(held)} replica(s) ({shown}); drain it first, "
                                         f"or force (they are placed again elsewhere)")
        await self.core.delete_node(name)
        return mesh.DeleteNodeResponse(replicas=held)

    async def Explain(self, request, context):
        kind = _kind(request.kind)
        if kind == "replicas":
            return mesh.ExplainResponse(lines=self._explain_replica(request.name))
        if kind == "deployments":
            return mesh.ExplainResponse(lines=self._explain_deployment(request.name))
        raise InvalidArgument("explain takes a replica or a deployment")

    def _explain_replica(self, name: str) -> list[str]:
        replica = self.cluster.replicas.get(name)
        if replica is None:
            raise NotFound(f"no replica named {name!r}")
        where = f"on {replica.node} GPU {','.join(map(str, replica.gpu_indices)) or '-'}" if replica.node \
            else "not placed"
        lines = [f"replica {replica.id} ({replica.deployment}, revision {replica.revision}): "
                 f"{replica.state}, {where}" + (f" — {replica.reason}" if replica.reason else "")]
        lines += list(replica.decision)
        return lines

    def _explain_deployment(self, name: str) -> list[str]:
        record = self.cluster.deployments.get(name)
        if record is None:
            raise NotFound(f"no deployment named {name!r}")
        replicas = self.cluster.replicas_of(name)
        lines = [f"deployment {name}: {self.cluster.ready_count(name)}/{record.replicas} ready, "
                 f"revision {record.revision}"]
        if record.canary_active:
            lines.append(f"  canary: revision {record.revision} takes {record.canary_weight}% of requests, "
                         f"revision {record.stable_revision} the rest; `scheduler ctl promote|rollback {name}`")
        for replica in replicas:
            detail = replica.reason if replica.state == PENDING else \
                f"{replica.node} GPU {','.join(map(str, replica.gpu_indices)) or '-'}"
            lines.append(f"  {replica.id}: {replica.state} ({detail})")
        return lines


def _replicas_after_apply(record: DeploymentRecord | None, spec) -> int:
    """The spec's count; for an autoscaled deployment already running, the autoscaler's count kept within the
    new bounds (applying the same spec again must not undo its decisions)."""
    if spec.autoscaling is None or record is None:
        return spec.replicas
    return min(max(record.replicas, spec.autoscaling.min_replicas), spec.autoscaling.max_replicas)


def _autoscaling_fields(record: DeploymentRecord) -> dict[str, Any]:
    config = record.spec.autoscaling
    if config is None:
        return {}
    return {"autoscaling": True, "min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
            "last_scaling": record.last_scaling}


def _revisions(record: DeploymentRecord) -> list[mesh.RevisionInfo]:
    """The kept revisions, each with what changed from the one before (top-level spec sections)."""
    infos: list[mesh.RevisionInfo] = []
    previous: dict[str, Any] | None = None
    for entry in record.history:
        spec = entry.spec.to_dict()
        if previous is None:
            change = "first revision kept"
        else:
            changed = [key for key in sorted(set(spec) | set(previous))
                       if key not in ("replicas", "revision_history", "rollout", "autoscaling")
                       and spec.get(key) != previous.get(key)]
            change = ", ".join(changed) or "no change to what replicas run"
        infos.append(mesh.RevisionInfo(revision=entry.revision, applied_unix_ms=entry.applied_unix_ms, change=change))
        previous = spec
    return infos
