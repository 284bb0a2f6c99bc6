"""The runtime's ``/metrics``: Triton's per-model metrics, read from the ModelStatistics recorders.

Every number is derived at scrape time from the same ``ModelStatisticsRecorder``
that answers the ModelStatistics RPC (runtime/statistics.py), so the two
always agree. Labels: ``model``, ``version`` (a replica started by a node
agent gets ``replica`` and ``node`` added by the agent's re-export,
node_agent/metrics.py).

Triton's names and meanings:
- ``nv_inference_request_success`` / ``_failure``: requests (inference_stats success / fail counts).
- ``nv_inference_count``: batch items inferred; ``nv_inference_exec_count``: batches executed.
- ``nv_inference_request_duration_us``: cumulative duration of successful requests, end to end.
- ``nv_inference_queue_duration_us``, ``nv_inference_compute_input_duration_us``,
  ``nv_inference_compute_infer_duration_us``, ``nv_inference_compute_output_duration_us``: cumulative.
- ``nv_inference_pending_request_count``: ModelInfer requests queued or executing now (0 for ensembles).
meshserve's: ``meshserve_runtime_batch_size`` (histogram of executed batch sizes, from ``batch_stats``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from meshserve.common.metrics import MODEL, VERSION, TritonCounter

from .statistics import ModelStatisticsRecorder

# Executed batch sizes: powers of two up to 1024 (max_batch_size beyond that lands in +Inf).
BATCH_SIZE_BUCKETS = tuple(2 ** i for i in range(11))

# (name, help, value of a recorder): Triton's counters, in Triton's order.
_COUNTERS: tuple[tuple[str, str, Callable[[ModelStatisticsRecorder], float]], ...] = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes",
     lambda s: s.success.count),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes",
     lambda s: s.fail.count),
    ("nv_inference_count", "Number of inferences performed (batch items)", lambda s: s.inference_count),
    ("nv_inference_exec_count", "Number of model executions performed (batches)", lambda s: s.execution_count),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds",
     lambda s: s.success.ns // 1000),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds",
     lambda s: s.queue.ns // 1000),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds",
     lambda s: s.compute_input.ns // 1000),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds",
     lambda s: s.compute_infer.ns // 1000),
    ("nv_inference_compute_output_duration_us", "Cumulative inference compute output duration in microseconds",
     lambda s: s.compute_output.ns // 1000),
)


class ServedVersion(Protocol):
    """What the collector reads of a loaded model version (runtime/model.py, runtime/ensemble.py)."""

    stats: ModelStatisticsRecorder


def batch_size_buckets(executions: dict[int, int]) -> list[tuple[str, float]]:
    """Cumulative (le, count) buckets of ``BATCH_SIZE_BUCKETS`` and +Inf from exact size counts."""
    buckets = [(str(float(bound)), float(sum(n for size, n in executions.items() if size <= bound)))
               for bound in BATCH_SIZE_BUCKETS]
    return [*buckets, ("+Inf", float(sum(executions.values())))]


class RuntimeCollector(Collector):
    """Reads ``models()`` (the served versions) at every scrape; holds no numbers of its own."""

    def __init__(self, models: Callable[[], Iterable[ServedVersion]]):
        self.models = models

    def collect(self) -> Iterator[Metric]:
        models = list(self.models())
        for name, documentation, value in _COUNTERS:
            # Not CounterMetricFamily: that one renames the samples NAME_total (common/metrics.py).
            family = TritonCounter(name, documentation)
            for model in models:
                family.add({MODEL: model.stats.name, VERSION: model.stats.version}, value(model.stats))
            yield family
        pending = Metric("nv_inference_pending_request_count",
                         "Instantaneous number of pending requests awaiting execution per-model", "gauge")
        for model in models:
            pending.add_sample(pending.name, {MODEL: model.stats.name, VERSION: model.stats.version},
                               float(getattr(model, "pending_requests", 0)))
        yield pending
        batches = HistogramMetricFamily("meshserve_runtime_batch_size", "Batch sizes executed (items per batch)",
                                        labels=[MODEL, VERSION])
        for model in models:
            executions = model.stats.executions_by_batch_size()
            total_items = sum(size * n for size, n in executions.items())
            batches.add_metric([model.stats.name, model.stats.version], batch_size_buckets(executions),
                               float(total_items))
        yield batches


def runtime_registry(models: Callable[[], Iterable[ServedVersion]]) -> CollectorRegistry:
    """A registry of its own for one runtime server (never the process-global default)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(models))
    return registry
