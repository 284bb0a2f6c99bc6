from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GpuProcess(_message.Message):
    __slots__ = ("pid", "used_memory_bytes")
    PID_FIELD_NUMBER: _ClassVar[int]
    USED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    pid: int
    used_memory_bytes: int
    def __init__(self, pid: _Optional[int] = ..., used_memory_bytes: _Optional[int] = ...) -> None: ...

class GpuInfo(_message.Message):
    __slots__ = ("index", "uuid", "name", "memory_total_bytes", "memory_used_bytes", "memory_free_bytes", "utilization_percent", "processes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    utilization_percent: int
    processes: _containers.RepeatedCompositeFieldContainer[GpuProcess]
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., memory_free_bytes: _Optional[int] = ..., utilization_percent: _Optional[int] = ..., processes: _Optional[_Iterable[_Union[GpuProcess, _Mapping]]] = ...) -> None: ...

class HostResources(_message.Message):
    __slots__ = ("cpu_cores", "memory_total_bytes", "memory_available_bytes")
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu_cores: int
    memory_total_bytes: int
    memory_available_bytes: int
    def __init__(self, cpu_cores: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("replica_id", "deployment", "revision", "state", "address", "pid", "gpu_indices", "exit_code", "message", "restarts", "in_flight", "queued")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    deployment: str
    revision: int
    state: str
    address: str
    pid: int
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    exit_code: int
    message: str
    restarts: int
    in_flight: int
    queued: int
    def __init__(self, replica_id: _Optional[str] = ..., deployment: _Optional[str] = ..., revision: _Optional[int] = ..., state: _Optional[str] = ..., address: _Optional[str] = ..., pid: _Optional[int] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., exit_code: _Optional[int] = ..., message: _Optional[str] = ..., restarts: _Optional[int] = ..., in_flight: _Optional[int] = ..., queued: _Optional[int] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("node_name", "agent_version", "labels", "gpu_source", "host", "gpus", "resources", "replicas")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    GPU_SOURCE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    agent_version: str
    labels: _containers.ScalarMap[str, str]
    gpu_source: str
    host: str
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    resources: HostResources
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    def __init__(self, node_name: _Optional[str] = ..., agent_version: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., gpu_source: _Optional[str] = ..., host: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ..., resources: _Optional[_Union[HostResources, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ...) -> None: ...

class UsageReport(_message.Message):
    __slots__ = ("sequence", "gpus", "resources", "replicas", "gpu_source")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    GPU_SOURCE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    resources: HostResources
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    gpu_source: str
    def __init__(self, sequence: _Optional[int] = ..., gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ..., resources: _Optional[_Union[HostResources, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., gpu_source: _Optional[str] = ...) -> None: ...

class LogsChunk(_message.Message):
    __slots__ = ("request_id", "lines", "end", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    lines: _containers.RepeatedScalarFieldContainer[str]
    end: bool
    error: str
    def __init__(self, request_id: _Optional[int] = ..., lines: _Optional[_Iterable[str]] = ..., end: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("register", "report", "logs")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    register: Register
    report: UsageReport
    logs: LogsChunk
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., report: _Optional[_Union[UsageReport, _Mapping]] = ..., logs: _Optional[_Union[LogsChunk, _Mapping]] = ...) -> None: ...

class ReplicaAssignment(_message.Message):
    __slots__ = ("replica_id", "deployment", "revision", "model_repository", "model_name", "gpu_indices", "env", "runtime_args", "artifact_digest", "artifact_source")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MODEL_REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_ARGS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    deployment: str
    revision: int
    model_repository: str
    model_name: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    env: _containers.ScalarMap[str, str]
    runtime_args: _containers.RepeatedScalarFieldContainer[str]
    artifact_digest: str
    artifact_source: str
    def __init__(self, replica_id: _Optional[str] = ..., deployment: _Optional[str] = ..., revision: _Optional[int] = ..., model_repository: _Optional[str] = ..., model_name: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., env: _Optional[_Mapping[str, str]] = ..., runtime_args: _Optional[_Iterable[str]] = ..., artifact_digest: _Optional[str] = ..., artifact_source: _Optional[str] = ...) -> None: ...

class Assignments(_message.Message):
    __slots__ = ("version", "replicas")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    version: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaAssignment]
    def __init__(self, version: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaAssignment, _Mapping]]] = ...) -> None: ...

class Registered(_message.Message):
    __slots__ = ("node_name", "report_interval_ms", "heartbeat_timeout_ms", "scheduler_id", "cluster_id")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    REPORT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    report_interval_ms: int
    heartbeat_timeout_ms: int
    scheduler_id: str
    cluster_id: str
    def __init__(self, node_name: _Optional[str] = ..., report_interval_ms: _Optional[int] = ..., heartbeat_timeout_ms: _Optional[int] = ..., scheduler_id: _Optional[str] = ..., cluster_id: _Optional[str] = ...) -> None: ...

class LogsRequest(_message.Message):
    __slots__ = ("request_id", "replica_id", "tail_lines", "max_bytes", "follow", "follow_seconds", "cancel")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    replica_id: str
    tail_lines: int
    max_bytes: int
    follow: bool
    follow_seconds: int
    cancel: bool
    def __init__(self, request_id: _Optional[int] = ..., replica_id: _Optional[str] = ..., tail_lines: _Optional[int] = ..., max_bytes: _Optional[int] = ..., follow: _Optional[bool] = ..., follow_seconds: _Optional[int] = ..., cancel: _Optional[bool] = ...) -> None: ...

class SchedulerMessage(_message.Message):
    __slots__ = ("registered", "assignments", "logs")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    registered: Registered
    assignments: Assignments
    logs: LogsRequest
    def __init__(self, registered: _Optional[_Union[Registered, _Mapping]] = ..., assignments: _Optional[_Union[Assignments, _Mapping]] = ..., logs: _Optional[_Union[LogsRequest, _Mapping]] = ...) -> None: ...

class ReplicaLogsRequest(_message.Message):
    __slots__ = ("replica", "tail_lines", "max_bytes", "follow", "follow_seconds")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    replica: str
    tail_lines: int
    max_bytes: int
    follow: bool
    follow_seconds: int
    def __init__(self, replica: _Optional[str] = ..., tail_lines: _Optional[int] = ..., max_bytes: _Optional[int] = ..., follow: _Optional[bool] = ..., follow_seconds: _Optional[int] = ...) -> None: ...

class ReplicaLogsChunk(_message.Message):
    __slots__ = ("lines",)
    LINES_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lines: _Optional[_Iterable[str]] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("name", "host", "state", "cordoned", "draining", "labels", "gpu_source", "gpus", "resources", "last_seen_unix_ms", "replicas", "cpu_allocated", "memory_allocated_bytes", "gpu_memory_allocated_bytes")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CORDONED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    GPU_SOURCE_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CPU_ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    host: str
    state: str
    cordoned: bool
    draining: bool
    labels: _containers.ScalarMap[str, str]
    gpu_source: str
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    resources: HostResources
    last_seen_unix_ms: int
    replicas: int
    cpu_allocated: float
    memory_allocated_bytes: int
    gpu_memory_allocated_bytes: int
    def __init__(self, name: _Optional[str] = ..., host: _Optional[str] = ..., state: _Optional[str] = ..., cordoned: _Optional[bool] = ..., draining: _Optional[bool] = ..., labels: _Optional[_Mapping[str, str]] = ..., gpu_source: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ..., resources: _Optional[_Union[HostResources, _Mapping]] = ..., last_seen_unix_ms: _Optional[int] = ..., replicas: _Optional[int] = ..., cpu_allocated: _Optional[float] = ..., memory_allocated_bytes: _Optional[int] = ..., gpu_memory_allocated_bytes: _Optional[int] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("name", "spec_yaml", "replicas", "ready_replicas", "revision", "model", "created_unix_ms", "revision_history", "stable_revision", "canary_weight", "model_digest", "revision_digests", "autoscaling", "min_replicas", "max_replicas", "last_scaling", "rollout_state", "rollout_started_unix_ms", "revisions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    READY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REVISION_HISTORY_FIELD_NUMBER: _ClassVar[int]
    STABLE_REVISION_FIELD_NUMBER: _ClassVar[int]
    CANARY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    REVISION_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    AUTOSCALING_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    LAST_SCALING_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_STATE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REVISIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec_yaml: str
    replicas: int
    ready_replicas: int
    revision: int
    model: str
    created_unix_ms: int
    revision_history: _containers.RepeatedScalarFieldContainer[int]
    stable_revision: int
    canary_weight: int
    model_digest: str
    revision_digests: _containers.RepeatedScalarFieldContainer[str]
    autoscaling: bool
    min_replicas: int
    max_replicas: int
    last_scaling: str
    rollout_state: str
    rollout_started_unix_ms: int
    revisions: _containers.RepeatedCompositeFieldContainer[RevisionInfo]
    def __init__(self, name: _Optional[str] = ..., spec_yaml: _Optional[str] = ..., replicas: _Optional[int] = ..., ready_replicas: _Optional[int] = ..., revision: _Optional[int] = ..., model: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., revision_history: _Optional[_Iterable[int]] = ..., stable_revision: _Optional[int] = ..., canary_weight: _Optional[int] = ..., model_digest: _Optional[str] = ..., revision_digests: _Optional[_Iterable[str]] = ..., autoscaling: _Optional[bool] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., last_scaling: _Optional[str] = ..., rollout_state: _Optional[str] = ..., rollout_started_unix_ms: _Optional[int] = ..., revisions: _Optional[_Iterable[_Union[RevisionInfo, _Mapping]]] = ...) -> None: ...

class RevisionInfo(_message.Message):
    __slots__ = ("revision", "applied_unix_ms", "change")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    revision: int
    applied_unix_ms: int
    change: str
    def __init__(self, revision: _Optional[int] = ..., applied_unix_ms: _Optional[int] = ..., change: _Optional[str] = ...) -> None: ...

class Replica(_message.Message):
    __slots__ = ("id", "deployment", "node", "gpu_indices", "address", "pid", "state", "reason", "restarts", "revision", "gpu_memory_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    deployment: str
    node: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    address: str
    pid: int
    state: str
    reason: str
    restarts: int
    revision: int
    gpu_memory_bytes: int
    def __init__(self, id: _Optional[str] = ..., deployment: _Optional[str] = ..., node: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., address: _Optional[str] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., restarts: _Optional[int] = ..., revision: _Optional[int] = ..., gpu_memory_bytes: _Optional[int] = ...) -> None: ...

class ApplyRequest(_message.Message):
    __slots__ = ("spec_yaml", "dry_run")
    SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    spec_yaml: str
    dry_run: bool
    def __init__(self, spec_yaml: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ApplyResponse(_message.Message):
    __slots__ = ("applied",)
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    applied: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, applied: _Optional[_Iterable[str]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("kind", "name")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("nodes", "deployments", "replicas")
    NODES_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ..., deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ..., replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("kind", "name")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("object", "events")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    object: GetResponse
    events: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, object: _Optional[_Union[GetResponse, _Mapping]] = ..., events: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("kind", "name")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ScaleRequest(_message.Message):
    __slots__ = ("name", "replicas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    replicas: int
    def __init__(self, name: _Optional[str] = ..., replicas: _Optional[int] = ...) -> None: ...

class ScaleResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeRequest(_message.Message):
    __slots__ = ("name", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    force: bool
    def __init__(self, name: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class NodeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeleteNodeRequest(_message.Message):
    __slots__ = ("name", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    force: bool
    def __init__(self, name: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class DeleteNodeResponse(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, replicas: _Optional[_Iterable[str]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("kind", "name")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("lines",)
    LINES_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lines: _Optional[_Iterable[str]] = ...) -> None: ...

class RolloutRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RolloutResponse(_message.Message):
    __slots__ = ("revision", "message")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    revision: int
    message: str
    def __init__(self, revision: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class LeaderRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaderResponse(_message.Message):
    __slots__ = ("is_leader", "leader_id", "leader_address")
    IS_LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    is_leader: bool
    leader_id: str
    leader_address: str
    def __init__(self, is_leader: _Optional[bool] = ..., leader_id: _Optional[str] = ..., leader_address: _Optional[str] = ...) -> None: ...

class ArtifactRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class ArtifactInfo(_message.Message):
    __slots__ = ("digest", "present", "size_bytes")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    digest: str
    present: bool
    size_bytes: int
    def __init__(self, digest: _Optional[str] = ..., present: _Optional[bool] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("digest", "size_bytes", "data")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size_bytes: int
    data: bytes
    def __init__(self, digest: _Optional[str] = ..., size_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class WakeRequest(_message.Message):
    __slots__ = ("deployment",)
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    def __init__(self, deployment: _Optional[str] = ...) -> None: ...

class WakeResponse(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class WatchLoadRequest(_message.Message):
    __slots__ = ("interval_ms",)
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    def __init__(self, interval_ms: _Optional[int] = ...) -> None: ...

class ReplicaLoad(_message.Message):
    __slots__ = ("in_flight", "queued")
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    queued: int
    def __init__(self, in_flight: _Optional[int] = ..., queued: _Optional[int] = ...) -> None: ...

class WatchRoutesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("replica_id", "address", "node")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    address: str
    node: str
    def __init__(self, replica_id: _Optional[str] = ..., address: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("model", "version", "deployment", "revision", "weight", "endpoints", "wakes_on_call", "no_endpoint_reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    WAKES_ON_CALL_FIELD_NUMBER: _ClassVar[int]
    NO_ENDPOINT_REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    deployment: str
    revision: int
    weight: int
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    wakes_on_call: bool
    no_endpoint_reason: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., deployment: _Optional[str] = ..., revision: _Optional[int] = ..., weight: _Optional[int] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., wakes_on_call: _Optional[bool] = ..., no_endpoint_reason: _Optional[str] = ...) -> None: ...

class RouteTable(_message.Message):
    __slots__ = ("version", "routes", "cluster_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    version: int
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    cluster_id: str
    def __init__(self, version: _Optional[int] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., cluster_id: _Optional[str] = ...) -> None: ...
