"""Summing ``ModelStatistics`` of several replicas into one, per (model, version).

Counts and durations add up; ``last_inference`` is the latest; batch
statistics add up per batch size, response statistics per key, memory
usage per (type, id). What one replica reports is its own share, so the
sum is what one server serving all that traffic would have reported.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor

from meshserve.protos.inference import grpc_service_pb2 as pb


def _add(total, part) -> None:
    """Add every numeric field of ``part`` into ``total`` (same message type), recursively."""
    for field, value in part.ListFields():
        name = field.name
        if name in ("name", "version", "batch_size", "type", "id"):
            continue
        if name == "last_inference":
            total.last_inference = max(total.last_inference, value)
        elif name == "batch_stats":
            by_size = {b.batch_size: b for b in total.batch_stats}
            for item in value:
                into = by_size.get(item.batch_size) or total.batch_stats.add(batch_size=item.batch_size)
                by_size[item.batch_size] = into
                _add(into, item)
        elif name == "memory_usage":
            by_key = {(m.type, m.id): m for m in total.memory_usage}
            for item in value:
                into = by_key.get((item.type, item.id)) or total.memory_usage.add(type=item.type, id=item.id)
                by_key[(item.type, item.id)] = into
                into.byte_size += item.byte_size
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            for key, item in value.items():
                _add(getattr(total, name)[key], item)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            _add(getattr(total, name), value)
        elif not field.is_repeated and isinstance(value, int):
            setattr(total, name, getattr(total, name) + value)


def aggregate(responses: list[pb.ModelStatisticsResponse]) -> pb.ModelStatisticsResponse:
    """One response with one entry per (name, version), in the order first seen."""
    merged: dict[tuple[str, str], pb.ModelStatistics] = {}
    for response in responses:
        for stats in response.model_stats:
            key = (stats.name, stats.version)
            if key not in merged:
                merged[key] = pb.ModelStatistics(name=stats.name, version=stats.version)
            _add(merged[key], stats)
    return pb.ModelStatisticsResponse(model_stats=list(merged.values()))
