"""Bridge between the cluster and the placement engine: snapshot in, decisions out.

A GPU's available memory is what its agent last reported free (NVML, or
the fake probe) less what is reserved for replicas placed on it that are not
ready yet (still loading, so not visible in the report): a GPU is never
promised twice. Every decision's explanation is kept on the replica, so
``explain`` can say why it is where it is, or why it is still pending.
"""

from __future__ import annotations

import collections

from . import placement
from .cluster import Cluster
from .needs import Needs
from .pipelines import place_pipeline, step_needs
from .records import NODE_READY, PENDING, PLACED, READY, ReplicaRecord, new_replica_id
from .spec import KIND_PIPELINE
from .writer import FencedWriter

# Per-node detail kept on a replica for `explain`: enough to read, bounded on a big cluster.
EXPLAIN_LINES_KEPT = 20


def build_snapshot(cluster: Cluster) -> list[placement.NodeView]:
    nodes = []
    for name in sorted(cluster.nodes):
        record = cluster.nodes[name]
        live = cluster.live.get(name)
        replicas = cluster.replicas_on(name)
        reserved: collections.Counter[int] = collections.Counter()
        cpu_used, memory_loading = 0.0, 0
        per_deployment: collections.Counter[str] = collections.Counter()
        for replica in replicas:
            per_deployment[replica.deployment] += 1
            needs = replica_needs(cluster, replica)
            cpu_used += needs.cpu
            if replica.state != READY:
                memory_loading += needs.memory
                for index in replica.gpu_indices:
                    reserved[index] += needs.gpu_memory
        gpus = [placement.GpuView(index=g.index, uuid=g.uuid, memory_total=g.memory_total_bytes,
                                  memory_free=g.memory_free_bytes, reserved=reserved[g.index])
                for g in (live.gpus if live else [])]
        nodes.append(placement.NodeView(
            name=name, labels=dict(record.labels), gpus=gpus,
            cpu_free=float(live.resources.cpu_cores if live else 0) - cpu_used,
            memory_free=int(live.resources.memory_available_bytes if live else 0) - memory_loading,
            cordoned=record.cordoned or record.draining,
            ready=record.state == NODE_READY and live is not None and live.connected,
            replicas=per_deployment,
        ))
    return nodes


def replica_needs(cluster: Cluster, replica: ReplicaRecord) -> Needs:
    """What one replica asks of a node: its revision's resources, or those of the pipeline steps it serves."""
    deployment = cluster.deployments.get(replica.deployment)
    if deployment is None:
        return Needs()
    spec = deployment.spec_of(replica.revision)
    if spec.kind != KIND_PIPELINE:
        return Needs.of(spec.resources, spec.placement)
    # A pipeline's replica needs what its steps need (a pending leader: nothing booked yet).
    served = [needs for model, needs in step_needs(spec) if model in replica.models]
    return Needs(gpus=max((n.gpus for n in served), default=0),
                 gpu_memory=max((n.gpu_memory for n in served), default=0),
                 cpu=sum(n.cpu for n in served), memory=sum(n.memory for n in served))


def _request(cluster: Cluster, replica: ReplicaRecord) -> placement.ReplicaRequest:
    needs = replica_needs(cluster, replica)
    return placement.ReplicaRequest(
        replica_id=replica.id, deployment=replica.deployment, gpus=needs.gpus, gpu_memory=needs.gpu_memory,
        cpu=needs.cpu, memory=needs.memory, node_selector=needs.node_selector, strategy=needs.strategy,
    )


async def place_pending(cluster: Cluster, writer: FencedWriter) -> bool:
    """Place every pending replica that fits; record why the others do not. True if anything changed."""
    pending = sorted((r for r in cluster.replicas.values() if r.state == PENDING), key=lambda r: r.id)
    if not pending:
        return False
    snapshot = placement.Snapshot.from_nodes(build_snapshot(cluster))  # one booking ledger per pass
    changed = []
    plain = []
    for replica in pending:
        deployment = cluster.deployments.get(replica.deployment)
        spec = deployment.spec_of(replica.revision) if deployment else None
        if spec is not None and spec.kind == KIND_PIPELINE:
            changed += place_pipeline(cluster, snapshot, replica, spec, new_replica_id)
        else:
            plain.append(replica)
    pending = plain
    decisions = placement.place(snapshot, [_request(cluster, r) for r in pending])
    for replica, decision in zip(pending, decisions, strict=True):
        if isinstance(decision, placement.Placement):
            replica.state, replica.node = PLACED, decision.node
            replica.gpu_indices = list(decision.gpu_indices)
            replica.gpu_memory_bytes = replica_needs(cluster, replica).gpu_memory
            replica.reason = ""
            replica.decision = placement.explain_lines(decision, limit=EXPLAIN_LINES_KEPT)
            cluster.record_event(f"replica/{replica.id}", f"placed on {decision.node} "
                                 f"GPU {','.join(map(str, decision.gpu_indices)) or '-'}")
            changed.append(replica)
        else:
            reason = placement.summary(decision)
            if reason != replica.reason:
                replica.reason = reason
                replica.decision = placement.explain_lines(decision, limit=EXPLAIN_LINES_KEPT)
                cluster.record_event(f"replica/{replica.id}", f"pending: {reason}")
                changed.append(replica)
    await writer.put_many(changed)
    cluster.placements += sum(1 for replica in changed if replica.state == PLACED)
    return bool(changed)
