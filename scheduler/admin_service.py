"""``mesh.AdminService``: what ``scheduler ctl`` calls. Changes are leader-only and fenced."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc

from .artifacts import BlobStore
from .core import SchedulerCore
from .records import NODE_LOST, PENDING, READY, DeploymentRecord, NodeRecord
from .spec import SOURCE_UPLOAD, URL_SCHEMES, parse_deployments
from .spec_fields import digest_of, model_of

KINDS = ("nodes", "deployments", "replicas")
_SINGULAR = {"node": "nodes", "deployment": "deployments", "replica": "replicas"}
# Replica ids named in a refusal: enough to recognise them, bounded for a node with hundreds.
NAMES_SHOWN = 5


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
                await self._commit(record, replicas=spec.replicas, fingerprint=fingerprint,  # a scale: no new revision
                                   spec=spec.to_dict(), spec_yaml=spec.to_yaml())
                self.cluster.record_event(f"deployment/{spec.name}", f"configured: {spec.replicas} replica(s)")
                applied.append(f"deployment/{spec.name} configured")
                continue
            new = self._next_record(record, spec, fingerprint)
            await self.core.writer.put(new)
            self.cluster.deployments[spec.name] = new
            self.cluster.record_event(f"deployment/{spec.name}", f"{verb}: revision {new.revision}, "
                                      f"{new.replicas} replica(s)")
            applied.append(f"deployment/{spec.name} {verb}")
        self.core.poke()
        return mesh.ApplyResponse(applied=applied)

    @staticmethod
    def _next_record(record: DeploymentRecord | None, spec, fingerprint: str) -> DeploymentRecord:
        """The record after applying a spec that needs a new revision."""
        now = time.time_ns() // 1_000_000
        spec_dict, spec_yaml = spec.to_dict(), spec.to_yaml()
        # Never a number used before: after a rollback the current revision is not the newest, and a
        # reused number would make spec_of() answer with the older revision's spec (and model bytes).
        revision = max([record.revision, *(entry["revision"] for entry in record.history)]) + 1 if record else 1
        entry = {"revision": revision, "spec": spec_dict, "spec_yaml": spec_yaml}
        keep = max(1, spec.revision_history)
        history = ((record.history if record else []) + [entry])[-keep:]
        if record is not None and spec.rollout.strategy == "canary":
            # The revision that served before stays stable (through a chain of canaries, the first).
            stable = record.stable_revision if record.canary_active else record.revision
        else:
            stable = revision
        return DeploymentRecord(
            name=spec.name, spec=spec_dict, spec_yaml=spec_yaml, fingerprint=fingerprint,
            revision_fingerprint=spec.revision_fingerprint(), revision=revision, replicas=spec.replicas,
            created_unix_ms=record.created_unix_ms if record else now, history=history, stable_revision=stable)

    def _deployment_record(self, name: str) -> DeploymentRecord:
        record = self.cluster.deployments.get(name)
        if record is None:
            raise NotFound(f"no deployment named {name!r}")
        return record

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
        if record.canary_active:
            target = record.stable_revision
        else:
            earlier = [entry["revision"] for entry in record.history if entry["revision"] < record.revision]
            if not earlier:
                raise FailedPrecondition(f"deployment {request.name!r} has no earlier revision in its history "
                                         f"(revision_history keeps {len(record.history)})")
            target = max(earlier)
        entry = next(e for e in record.history if e["revision"] == target)
        [spec] = parse_deployments(entry["spec_yaml"])
        spec = spec.replace(replicas=record.replicas)
        previous = record.revision
        await self._commit(record, revision=target, stable_revision=target, spec=spec.to_dict(),
                           spec_yaml=spec.to_yaml(), fingerprint=spec.fingerprint(),
                           revision_fingerprint=spec.revision_fingerprint())
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
        if live:
            node.gpus.extend(live.gpus)
            node.resources.CopyFrom(live.resources)
        return node

    def _deployment(self, name: str) -> mesh.Deployment:
        record = self.cluster.deployments.get(name)
        if record is None:
            raise NotFound(f"no deployment named {name!r}")
        replicas = self.cluster.replicas_of(name)
        return mesh.Deployment(
            name=name, spec_yaml=record.spec_yaml, replicas=record.replicas,
            ready_replicas=sum(1 for r in replicas if r.state == READY and r.revision == (
                record.stable_revision if record.canary_active else record.revision)),
            revision=record.revision, model=model_of(record.spec)[1], created_unix_ms=record.created_unix_ms,
            revision_history=[entry["revision"] for entry in record.history],
            stable_revision=record.stable_revision or record.revision, canary_weight=record.canary_weight,
            model_digest=digest_of(record.spec),
            revision_digests=[digest_of(entry["spec"]) for entry in record.history])

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
        await self._set_node_flags(request.name, cordoned=True, draining=True)
        return mesh.NodeResponse()

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
        ready = sum(1 for r in replicas if r.state == READY)
        lines = [f"deployment {name}: {ready}/{record.replicas} ready, revision {record.revision}"]
        if record.canary_active:
            lines.append(f"  canary: revision {record.revision} takes {record.canary_weight}% of requests, "
                         f"revision {record.stable_revision} the rest; `scheduler ctl promote|rollback {name}`")
        for replica in replicas:
            detail = replica.reason if replica.state == PENDING else \
                f"{replica.node} GPU {','.join(map(str, replica.gpu_indices)) or '-'}"
            lines.append(f"  {replica.id}: {replica.state} ({detail})")
        return lines
