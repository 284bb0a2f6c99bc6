"""What ``scheduler ctl`` prints, for ``-o table|json|yaml``.

Tables are for people, in kubectl's manner: headers in capitals, columns
aligned with three spaces between them, no trailing spaces, sizes in GiB
(MiB under 1 GiB), ages like ``45s``, ``5m``, ``3h20m``, ``12d``, and ``-``
for an empty cell. A node with fake GPUs says ``fake`` in SOURCE and its GPU
count reads ``2 (fake)``, so a made-up GPU is never mistaken for a real one.
A table cell is always one line: a multi-line reason (a crash's stderr tail)
is folded and shortened; ``describe`` shows it whole.

json and yaml are for programs: protobuf's JSON mapping of the admin API's
messages (``MessageToDict`` with proto field names, every field present, and
64-bit integers as numbers), so ``jq`` and scripts see a stable shape.

Every function here is pure: the time "now" is a parameter, never read inside.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import yaml
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from meshserve.common.artifacts import short as short_digest
from meshserve.protos.mesh import control_pb2 as pb

FORMATS = ("table", "json", "yaml")
GIB = 2**30
MIB = 2**20
COLUMN_GAP = "   "
NONE = "-"
# A REASON cell longer than this is cut; the whole text is in `describe`.
REASON_WIDTH = 60


# ---------------------------------------------------------------- cells


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Aligned columns; the last column is never padded."""
    cells = [[str(h) for h in headers]] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        # strict=False: the last column is never padded, so its width goes unused
        padded = [value.ljust(width) for value, width in zip(row[:-1], widths, strict=False)] + [row[-1]]
        lines.append(COLUMN_GAP.join(padded).rstrip())
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    text = NONE if value is None or value == "" else str(value)
    return " ".join(text.split())


def human_size(size: int) -> str:
    """``79.2GiB``; under one GiB, whole MiB (``512MiB``)."""
    if size < GIB:
        return f"{round(size / MIB)}MiB"
    return f"{size / GIB:.1f}GiB"


def age(since_unix_ms: int, now_unix_ms: int) -> str:
    """kubectl's short durations: 45s, 5m30s, 45m, 3h20m, 30h, 3d4h, 12d, 2y40d."""
    if since_unix_ms <= 0:
        return NONE
    seconds = max(0, (now_unix_ms - since_unix_ms) // 1000)
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if days < 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    return f"{days // 365}y{days % 365}d" if days % 365 else f"{days // 365}y"


def _shorten(text: str, width: int = REASON_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _labels(labels: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "<none>"


def _node_state(node: pb.Node) -> str:
    state = node.state or "unknown"
    if node.draining:
        return f"{state},draining"
    if node.cordoned:
        return f"{state},cordoned"
    return state


def _gpu_count(node: pb.Node) -> str:
    count = str(len(node.gpus))
    return f"{count} (fake)" if node.gpu_source == "fake" and node.gpus else count


def _gpu_memory(node: pb.Node) -> str:
    if not node.gpus:
        return NONE
    free = sum(gpu.memory_free_bytes for gpu in node.gpus)
    total = sum(gpu.memory_total_bytes for gpu in node.gpus)
    return f"{free / GIB:.1f}/{total / GIB:.1f}GiB"


def _allocated(node: pb.Node) -> str:
    """Booked by the node's replicas / what the node has: ``1.5/8 cores, 2.0/31.2GiB, 10.0/80.0GiB``."""
    gpu_total = sum(gpu.memory_total_bytes for gpu in node.gpus)
    return (f"{node.cpu_allocated:g}/{node.resources.cpu_cores}, "
            f"{node.memory_allocated_bytes / GIB:.1f}/{node.resources.memory_total_bytes / GIB:.1f}GiB, "
            f"{node.gpu_memory_allocated_bytes / GIB:.1f}/{gpu_total / GIB:.1f}GiB")


def _indices(indices: Sequence[int]) -> str:
    return ",".join(str(i) for i in indices) or NONE


# ---------------------------------------------------------------- tables


def nodes_table(nodes: Sequence[pb.Node]) -> str:
    return table(
        ("NAME", "STATE", "GPUS", "GPU-MEMORY(FREE/TOTAL)", "ALLOCATED(CPU/MEMORY/GPU-MEMORY)", "SOURCE",
         "REPLICAS", "LABELS"),
        ((n.name, _node_state(n), _gpu_count(n), _gpu_memory(n), _allocated(n), n.gpu_source, n.replicas,
          _labels(n.labels)) for n in nodes),
    )


def deployments_table(deployments: Sequence[pb.Deployment], now_unix_ms: int) -> str:
    """With an autoscaled deployment among them, two more columns: its bounds and its last scaling decision."""
    autoscaled = any(d.autoscaling for d in deployments)
    return table(
        ("NAME", "MODEL", "READY/DESIRED", "REVISION", "DIGEST", "AGE")
        + (("AUTOSCALE(MIN-MAX)", "LAST-SCALING") if autoscaled else ()),
        ((d.name, d.model, f"{d.ready_replicas}/{d.replicas}", d.revision, short_digest(d.model_digest) or "-",
          age(d.created_unix_ms, now_unix_ms))
         + ((f"{d.min_replicas}-{d.max_replicas}" if d.autoscaling else NONE,
             _shorten(d.last_scaling) if d.last_scaling else NONE) if autoscaled else ())
         for d in deployments),
    )


def replicas_table(replicas: Sequence[pb.Replica]) -> str:
    return table(
        ("NAME", "DEPLOYMENT", "REVISION", "NODE", "GPU", "ADDRESS", "PID", "STATE", "RESTARTS", "REASON"),
        ((r.id, r.deployment, r.revision or NONE, r.node, _indices(r.gpu_indices), r.address, r.pid or NONE, r.state,
          r.restarts, _shorten(r.reason)) for r in replicas),
    )


def rollout_progress(deployment: pb.Deployment, replicas: Sequence[pb.Replica]) -> tuple[str, str]:
    """(progressing | complete | failed, one line saying where the rollout is), as `rollout status` prints."""
    name, revision = deployment.name, deployment.revision
    state = deployment.rollout_state
    if state.startswith(("failed", "rolled back")):
        return "failed", f"deployment/{name}: rollout {state}"
    current = [r for r in replicas if r.revision == revision and r.state != "draining"]
    ready = sum(1 for r in current if r.state == "ready")
    old = [r for r in replicas if r.revision != revision and r.state != "draining"]
    if ready >= deployment.replicas and not old:
        return "complete", f"deployment/{name}: revision {revision} rolled out ({ready} of {deployment.replicas} ready)"
    return "progressing", (f"deployment/{name}: waiting for revision {revision}: {ready} of {deployment.replicas} "
                           f"updated replicas ready, {len(old)} old replica(s) left")


def revisions_table(deployment: pb.Deployment, now_unix_ms: int) -> str:
    return table(
        ("REVISION", "APPLIED", "CHANGE", ""),
        ((r.revision, age(r.applied_unix_ms, now_unix_ms) + " ago" if r.applied_unix_ms else NONE, r.change,
          "(current)" if r.revision == deployment.revision else "") for r in deployment.revisions),
    )


def get_table(response: pb.GetResponse, kind: str, now_unix_ms: int) -> str:
    """The table for ``get KIND`` (kind: nodes | deployments | replicas)."""
    if kind == "nodes":
        return nodes_table(response.nodes)
    if kind == "deployments":
        return deployments_table(response.deployments, now_unix_ms)
    return replicas_table(response.replicas)


# ---------------------------------------------------------------- json / yaml


def to_data(message: Message) -> dict[str, Any]:
    """protobuf's JSON mapping, every field present, keys in the order the .proto declares them."""
    data = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _in_field_order(message.DESCRIPTOR, data)


# protobuf's JSON mapping quotes 64-bit integers; counts, revisions and byte sizes read better as numbers, and
# protobuf 6 (which Triton's client needs) has no option to unquote them, so this does it for every version.
_INT64_TYPES = frozenset({FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64})


def _unquoted(field: Any, value: Any) -> Any:
    if field.type not in _INT64_TYPES:
        return value
    if isinstance(value, list):
        return [int(item) for item in value]
    return int(value)


def _in_field_order(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    # MessageToDict puts set fields before defaulted ones; people read a fixed order better.
    ordered = {}
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = _unquoted(field, data[field.name])
        nested = field.message_type
        if nested is not None and not nested.GetOptions().map_entry:
            if isinstance(value, list):
                value = [_in_field_order(nested, item) for item in value]
            elif isinstance(value, dict):
                value = _in_field_order(nested, value)
        ordered[field.name] = value
    return ordered


def dump(data: Any, fmt: str) -> str:
    """``data`` (plain dicts and lists) as json or yaml text ending in a newline."""
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def get_data(response: pb.GetResponse, kind: str) -> dict[str, Any]:
    """``{"nodes": [...]}``: only the kind asked for, even when the list is empty."""
    return {kind: [to_data(item) for item in getattr(response, kind)]}


def render(message: Message, fmt: str) -> str:
    return dump(to_data(message), fmt)


# ---------------------------------------------------------------- describe


def _when(unix_ms: int, now_unix_ms: int) -> str:
    if unix_ms <= 0:
        return NONE
    moment = datetime.datetime.fromtimestamp(unix_ms / 1000, tz=datetime.UTC)
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC ({age(unix_ms, now_unix_ms)} ago)"


def _fields(pairs: Sequence[tuple[str, Any]]) -> list[str]:
    width = max(len(key) for key, _ in pairs) + 2
    return [f"{key + ':':<{width}}{_cell(value)}" for key, value in pairs]


def _indent(text: str, prefix: str = "  ") -> list[str]:
    return [prefix + line if line else line for line in text.rstrip("\n").split("\n")]


def _describe_node(node: pb.Node, now_unix_ms: int) -> list[str]:
    res = node.resources
    lines = _fields([
        ("Name", node.name), ("Host", node.host), ("State", _node_state(node)),
        ("Labels", _labels(node.labels)),
        ("GPU source", node.gpu_source + (" (not real GPUs)" if node.gpu_source == "fake" else "")),
        ("CPU cores", res.cpu_cores or NONE),
        ("Memory", f"{human_size(res.memory_available_bytes)} available of {human_size(res.memory_total_bytes)}"
         if res.memory_total_bytes else NONE),
        ("Replicas", node.replicas), ("Last seen", _when(node.last_seen_unix_ms, now_unix_ms)),
    ])
    lines.append("GPUs:")
    if not node.gpus:
        lines.append("  <none>")
    else:
        lines += _indent(table(
            ("INDEX", "NAME", "MEMORY(USED/TOTAL)", "FREE", "UTIL", "PROCESSES", "UUID"),
            ((g.index, g.name, f"{g.memory_used_bytes / GIB:.1f}/{g.memory_total_bytes / GIB:.1f}GiB",
              human_size(g.memory_free_bytes), f"{g.utilization_percent}%",
              ",".join(str(p.pid) for p in g.processes), g.uuid) for g in node.gpus)))
    return lines


def _describe_deployment(deployment: pb.Deployment, now_unix_ms: int) -> list[str]:
    digests = list(deployment.revision_digests) + [""] * len(deployment.revision_history)
    history = ", ".join(f"{r} ({short_digest(d)})" if d else str(r)
                        for r, d in zip(deployment.revision_history, digests, strict=False)) or "<none>"
    lines = _fields([
        ("Name", deployment.name), ("Model", deployment.model),
        ("Replicas", f"{deployment.replicas} desired, {deployment.ready_replicas} ready"),
        ("Revision", deployment.revision), ("Digest", deployment.model_digest or "<none>"), ("History", history),
        ("Created", _when(deployment.created_unix_ms, now_unix_ms)),
    ])
    lines.append("Spec:")
    lines += _indent(deployment.spec_yaml) if deployment.spec_yaml.strip() else ["  <none>"]
    return lines


def _describe_replica(replica: pb.Replica) -> list[str]:
    lines = _fields([
        ("Name", replica.id), ("Deployment", replica.deployment), ("Revision", replica.revision),
        ("Node", replica.node), ("GPUs", _indices(replica.gpu_indices)),
        ("GPU memory", human_size(replica.gpu_memory_bytes) if replica.gpu_memory_bytes else NONE),
        ("Address", replica.address), ("PID", replica.pid or NONE), ("State", replica.state),
        ("Restarts", replica.restarts),
    ])
    lines.append("Reason:")
    lines += _indent(replica.reason) if replica.reason.strip() else ["  <none>"]
    return lines


def describe_text(response: pb.DescribeResponse, kind: str, now_unix_ms: int) -> str:
    """kubectl-describe-like text: the object's fields, related objects as tables, then events.

    ``kind`` is node | deployment | replica; the object is the first of that
    kind in ``response.object``, and the other lists there are shown as tables.
    """
    obj = response.object
    lines: list[str] = []
    if kind == "node" and obj.nodes:
        lines += _describe_node(obj.nodes[0], now_unix_ms)
    elif kind == "deployment" and obj.deployments:
        lines += _describe_deployment(obj.deployments[0], now_unix_ms)
    elif kind == "replica" and obj.replicas:
        lines += _describe_replica(obj.replicas[0])
    owner = (obj.deployments[0].name if kind == "deployment" and obj.deployments
             else obj.nodes[0].name if kind == "node" and obj.nodes else "")
    replicas_title = {"deployment": "Replicas of", "node": "Replicas on"}.get(kind, "Replicas")
    if owner:
        replicas_title += f" {owner}"
    related: list[tuple[str, Sequence[Any], Callable[[Sequence[Any]], str]]] = [
        ("Nodes", obj.nodes[1:] if kind == "node" else obj.nodes, nodes_table),
        ("Deployments", obj.deployments[1:] if kind == "deployment" else obj.deployments,
         lambda items: deployments_table(items, now_unix_ms)),
        (replicas_title, obj.replicas[1:] if kind == "replica" else obj.replicas, replicas_table),
    ]
    for title, items, render_table in related:
        if items:
            lines.append(f"{title}:")
            lines += _indent(render_table(items))
    lines.append("Events:")
    lines += [f"  {event}" for event in response.events] or ["  <none>"]
    return "\n".join(lines) + "\n"
