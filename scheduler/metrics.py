"""The scheduler's ``/metrics`` (``scheduler serve --metrics-listen``), one registry per scheduler.

Exported (label names as every daemon's, common/metrics.py):
- ``meshserve_scheduler_leader``: 1 while this scheduler leads, else 0.
- ``meshserve_scheduler_agents_connected``: node agents with an open stream to this scheduler.
- ``meshserve_scheduler_replicas{deployment,state}``: replicas by lifecycle state (the leader's view).
- ``meshserve_scheduler_pending_replicas{reason}``: pending replicas by the placement's reason. The
  reason is the placement summary, cut to ``REASON_CHARS``; there are never more series than pending replicas.
- ``meshserve_scheduler_placements_total``: replicas placed on a node by this process.
- ``meshserve_scheduler_reconcile_duration_seconds``: histogram of reconcile passes.
- ``meshserve_scheduler_store_request_duration_seconds{op}``: histogram of store calls (get, range, put,
  delete, txn, grant_lease, keep_alive, revoke_lease, compact), failed ones included.
A standby reports leader 0 and the replica figures of the state it last led with (none if it never led).
"""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .records import PENDING

if TYPE_CHECKING:
    from .core import SchedulerCore
    from .store.base import WatchEvent

REASON_CHARS = 120
# Reconcile passes: a quiet pass takes ~100 µs, a big placement pass with store writes up to seconds.
RECONCILE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                       2.5, 5.0)
# Store calls: SQLite on a local disk ~100 µs, etcd over a LAN a few ms; beyond a second is an outage.
STORE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _text(value: object) -> str:
    return str(getattr(value, "value", value))


class _StateCollector(Collector):
    """Reads the scheduler core at scrape time: no number is kept twice."""

    def __init__(self, core: Callable[[], SchedulerCore | None]):
        self.core = core

    def collect(self) -> Iterator[Metric]:
        core = self.core()
        leader = GaugeMetricFamily("meshserve_scheduler_leader", "1 while this scheduler leads, else 0")
        leader.add_metric([], 1.0 if core is not None and core.leading else 0.0)
        yield leader
        connected = GaugeMetricFamily("meshserve_scheduler_agents_connected",
                                      "Node agents with an open stream to this scheduler")
        live = core.cluster.live.values() if core is not None else ()
        connected.add_metric([], float(sum(1 for node in live if node.connected)))
        yield connected
        replicas = GaugeMetricFamily("meshserve_scheduler_replicas", "Replicas by lifecycle state",
                                     labels=["deployment", "state"])
        pending = GaugeMetricFamily("meshserve_scheduler_pending_replicas",
                                    "Pending replicas by the reason they are not placed", labels=["reason"])
        by_state: collections.Counter = collections.Counter()
        by_reason: collections.Counter = collections.Counter()
        for replica in (core.cluster.replicas.values() if core is not None else ()):
            by_state[replica.deployment, _text(replica.state)] += 1
            if replica.state == PENDING:
                by_reason[(replica.reason or "not placed yet")[:REASON_CHARS]] += 1
        for (deployment, state), count in sorted(by_state.items()):
            replicas.add_metric([deployment, state], float(count))
        for reason, count in sorted(by_reason.items()):
            pending.add_metric([reason], float(count))
        yield replicas
        yield pending
        placements = CounterMetricFamily("meshserve_scheduler_placements", "Replicas placed on a node")
        placements.add_metric([], float(core.cluster.placements if core is not None else 0))
        yield placements


class SchedulerMetrics:
    """The registry of one scheduler; ``core`` returns its core once it has one."""

    def __init__(self, core: Callable[[], SchedulerCore | None]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StateCollector(core))
        self.reconcile_seconds = Histogram("meshserve_scheduler_reconcile_duration_seconds",
                                           "Duration of a reconcile pass", registry=self.registry,
                                           buckets=RECONCILE_BUCKETS_S)
        self.store_seconds = Histogram("meshserve_scheduler_store_request_duration_seconds",
                                       "Duration of a store call, failed ones included", ["op"],
                                       registry=self.registry, buckets=STORE_BUCKETS_S)
        self.store_errors = Counter("meshserve_scheduler_store_errors", "Store calls that raised", ["op"],
                                    registry=self.registry)


_TIMED_CALLS = ("get", "range", "put", "delete", "txn", "grant_lease", "keep_alive", "revoke_lease", "compact")


class TimedStore:
    """A store (scheduler/store/base.py) whose calls are timed into ``metrics``; everything else passes through."""

    def __init__(self, store, metrics: SchedulerMetrics):
        self._store = store
        self._metrics = metrics

    def __getattr__(self, name: str):
        attribute = getattr(self._store, name)
        if name not in _TIMED_CALLS:
            return attribute
        seconds = self._metrics.store_seconds.labels(name)
        errors = self._metrics.store_errors.labels(name)

        async def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return await attribute(*args, **kwargs)
            except Exception:
                errors.inc()
                raise
            finally:
                seconds.observe(time.perf_counter() - started)

        return timed

    def watch(self, prefix: str, start_revision: int) -> AsyncGenerator[WatchEvent, None]:
        return self._store.watch(prefix, start_revision)
