"""Per-model counters and durations in Triton's ModelStatistics shape.

All durations are nanoseconds from ``time.perf_counter_ns``. A request's
queue time runs from arrival to the start of its batch; the compute times of
a batch are attributed to every request in it (as Triton does), while
``execution_count`` and ``batch_stats`` count batches.
"""

from __future__ import annotations

import time
from collections import defaultdict

from meshserve.protos.inference import grpc_service_pb2 as pb


class _Duration:
    __slots__ = ("count", "ns")

    def __init__(self):
        self.count = 0
        self.ns = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def fill(self, message: pb.StatisticDuration) -> None:
        message.count = self.count
        message.ns = self.ns


class _BatchDurations:
    __slots__ = ("compute_input", "compute_infer", "compute_output")

    def __init__(self):
        self.compute_input = _Duration()
        self.compute_infer = _Duration()
        self.compute_output = _Duration()


class ModelStatisticsRecorder:
    """Accumulates one model version's statistics; all methods run on the event loop."""

    def __init__(self, name: str, version: str):
        self.name = name
        self.version = version
        self.last_inference_ms = 0
        self.inference_count = 0
        self.execution_count = 0
        self.success = _Duration()
        self.fail = _Duration()
        self.queue = _Duration()
        self.compute_input = _Duration()
        self.compute_infer = _Duration()
        self.compute_output = _Duration()
        self._batches: dict[int, _BatchDurations] = defaultdict(_BatchDurations)

    def record_batch(self, requests: int, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One execution of ``batch_size`` items from ``requests`` requests."""
        self.execution_count += 1
        self.inference_count += batch_size
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        batch = self._batches[batch_size]
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)

    def record_queue(self, ns: int) -> None:
        self.queue.add(ns)

    def record_request(self, ok: bool, ns: int) -> None:
        (self.success if ok else self.fail).add(ns)

    def executions_by_batch_size(self) -> dict[int, int]:
        """Batch size -> executions of that size (``batch_stats``' counts; runtime/metrics.py's histogram)."""
        return {size: self._batches[size].compute_infer.count for size in sorted(self._batches)}

    def to_proto(self) -> pb.ModelStatistics:
        message = pb.ModelStatistics(
            name=self.name,
            version=self.version,
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
        )
        stats = message.inference_stats
        for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            getattr(self, field).fill(getattr(stats, field))
        for size in sorted(self._batches):
            durations = self._batches[size]
            batch = message.batch_stats.add(batch_size=size)
            durations.compute_input.fill(batch.compute_input)
            durations.compute_infer.fill(batch.compute_infer)
            durations.compute_output.fill(batch.compute_output)
        return message
