"""Conversion between the control-plane protobufs and the agent's own types.

The only module besides ``agent`` that knows ``protos.mesh.control_pb2``;
the supervisor, replicas and probes stay transport-free.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshserve.protos.mesh import control_pb2 as pb

from .gpu_probe import GpuSample
from .host import HostResources
from .replica import ReplicaSpec, ReplicaStatus


def spec_from_assignment(assignment: pb.ReplicaAssignment) -> ReplicaSpec:
    return ReplicaSpec.create(
        assignment.replica_id,
        deployment=assignment.deployment,
        revision=assignment.revision,
        model_repository=assignment.model_repository,
        model_name=assignment.model_name,
        gpu_indices=list(assignment.gpu_indices),
        env=dict(assignment.env),
        runtime_args=list(assignment.runtime_args),
        artifact_digest=assignment.artifact_digest,
        artifact_source=assignment.artifact_source,
    )


def gpu_info(sample: GpuSample) -> pb.GpuInfo:
    return pb.GpuInfo(
        index=sample.index, uuid=sample.uuid, name=sample.name,
        memory_total_bytes=sample.memory_total_bytes,
        memory_used_bytes=sample.memory_used_bytes,
        memory_free_bytes=sample.memory_free_bytes,
        utilization_percent=sample.utilization_percent,
        processes=[pb.GpuProcess(pid=p.pid, used_memory_bytes=p.used_memory_bytes) for p in sample.processes],
    )


def host_resources(resources: HostResources) -> pb.HostResources:
    return pb.HostResources(cpu_cores=resources.cpu_cores, memory_total_bytes=resources.memory_total_bytes,
                            memory_available_bytes=resources.memory_available_bytes)


def replica_status(status: ReplicaStatus) -> pb.ReplicaStatus:
    return pb.ReplicaStatus(
        replica_id=status.replica_id, deployment=status.deployment, revision=status.revision,
        state=status.state, address=status.address, pid=status.pid, gpu_indices=list(status.gpu_indices),
        exit_code=status.exit_code, message=status.message, restarts=status.restarts,
        in_flight=status.in_flight, queued=status.queued,
    )


def register(*, node_name: str, agent_version: str, labels: dict[str, str], gpu_source: str, host: str,
             gpus: Iterable[GpuSample], resources: HostResources, replicas: Iterable[ReplicaStatus]) -> pb.AgentMessage:
    return pb.AgentMessage(register=pb.Register(
        node_name=node_name, agent_version=agent_version, labels=labels, gpu_source=gpu_source, host=host,
        gpus=[gpu_info(sample) for sample in gpus], resources=host_resources(resources),
        replicas=[replica_status(status) for status in replicas],
    ))


def usage_report(*, sequence: int, gpu_source: str, gpus: Iterable[GpuSample], resources: HostResources,
                 replicas: Iterable[ReplicaStatus]) -> pb.AgentMessage:
    return pb.AgentMessage(report=pb.UsageReport(
        sequence=sequence, gpu_source=gpu_source, gpus=[gpu_info(sample) for sample in gpus],
        resources=host_resources(resources), replicas=[replica_status(status) for status in replicas],
    ))
