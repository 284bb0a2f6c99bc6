"""The proxy's metrics, in the Prometheus text format, under Triton's names where one exists.

Hand-written rather than prometheus_client: that library appends ``_total``
to every counter, and Triton's counters (``nv_inference_request_success``
...) have no suffix; dashboards built for Triton query these exact names.

Per model, version and replica:
- ``nv_inference_request_success`` / ``nv_inference_request_failure``
  (failure also by ``reason``: the gRPC status) — unary ModelInfer calls,
  counted on the replica that answered.
- ``nv_inference_count``: requests forwarded, streamed ones included. The
  proxy does not decode tensors, so a batched request counts once (Triton
  counts its batch items).
- ``nv_inference_pending_request_count``: calls and streams in flight.
- ``nv_inference_request_duration_us``: cumulative ModelInfer time, as
  Triton's; ``meshserve_proxy_request_duration_seconds`` its histogram.
Proxy-only: ``meshserve_proxy_retries_total`` (model, reason),
``meshserve_proxy_rejected_total`` (reason; calls refused before routing,
without the model label so a client cannot grow the label set),
``meshserve_proxy_streams_total`` (model, replica, code),
``meshserve_proxy_route_table_version``, ``meshserve_proxy_endpoints``
(in rotation or not).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

# Latency buckets (s): 0.5 ms to 30 s, about x2.5 apart; inference spans
# sub-millisecond CPU models to multi-second generation.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


_Child = TypeVar("_Child")
_F = TypeVar("_F", bound="_Family[Any]")


class _Family(Generic[_Child]):
    type = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: tuple[str, ...]):
        self.name = name
        self.help = help_text
        self.labelnames = labelnames
        self.children: dict[tuple[str, ...], _Child] = {}

    def _labels(self, values: tuple[str, ...], extra: Iterable[tuple[str, str]] = ()) -> str:
        pairs = [*zip(self.labelnames, values, strict=True), *extra]
        if not pairs:
            return ""
        return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs) + "}"

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.type}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class _Value:
    __slots__ = ("value",)

    def __init__(self):
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class Counter(_Family[_Value]):
    type = "counter"

    def labels(self, *values: str) -> _Value:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = _Value()
        return child

    def render(self) -> list[str]:
        return [f"{self.name}{self._labels(k)} {_number(v.value)}" for k, v in self.children.items()]


class Gauge(Counter):
    type = "gauge"


class _Buckets:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        index = bisect.bisect_left(self.bounds, value)
        if index < len(self.counts):
            self.counts[index] += 1


class Histogram(_Family[_Buckets]):
    type = "histogram"

    def __init__(self, name: str, help_text: str, labelnames: tuple[str, ...], buckets: tuple[float, ...]):
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(buckets))

    def labels(self, *values: str) -> _Buckets:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = _Buckets(self.buckets)
        return child

    def render(self) -> list[str]:
        lines = []
        for key, child in self.children.items():
            cumulative = 0
            for bound, count in zip(child.bounds, child.counts, strict=True):
                cumulative += count
                lines.append(f"{self.name}_bucket{self._labels(key, [('le', _number(bound))])} {cumulative}")
            lines.append(f"{self.name}_bucket{self._labels(key, [('le', '+Inf')])} {child.count}")
            lines.append(f"{self.name}_sum{self._labels(key)} {_number(child.sum)}")
            lines.append(f"{self.name}_count{self._labels(key)} {child.count}")
        return lines


class Registry:
    """Families in registration order; ``collectors`` refresh gauges just before rendering."""

    def __init__(self) -> None:
        self.families: list[_Family[Any]] = []
        self.collectors: list[Callable[[], None]] = []

    def add(self, family: _F) -> _F:
        self.families.append(family)
        return family

    def render(self) -> str:
        for collect in self.collectors:
            collect()
        lines: list[str] = []
        for family in self.families:
            lines += family.header() + family.render()
        return "\n".join(lines) + "\n"


REPLICA = ("model", "version", "replica")


class ProxyMetrics:
    """Every metric the proxy exports, in one registry owned by one ``ProxyServer``."""

    def __init__(self):
        self.registry = r = Registry()
        self.success = r.add(Counter("nv_inference_request_success",
                                     "Number of successful inference requests (ModelInfer) forwarded", REPLICA))
        self.failure = r.add(Counter("nv_inference_request_failure",
                                     "Number of failed inference requests (ModelInfer), by gRPC status",
                                     (*REPLICA, "reason")))
        self.count = r.add(Counter("nv_inference_count",
                                   "Number of inference requests forwarded (a batched request counts once)",
                                   REPLICA))
        self.pending = r.add(Gauge("nv_inference_pending_request_count",
                                   "Inference calls and streams in flight to the replica", REPLICA))
        self.duration_us = r.add(Counter("nv_inference_request_duration_us",
                                         "Cumulative ModelInfer duration through the proxy, in microseconds",
                                         REPLICA))
        self.latency = r.add(Histogram("meshserve_proxy_request_duration_seconds",
                                       "ModelInfer duration through the proxy", ("model", "version"),
                                       LATENCY_BUCKETS_S))
        self.retries = r.add(Counter("meshserve_proxy_retries_total",
                                     "Calls sent again to another replica, by the status that caused it",
                                     ("model", "reason")))
        self.retries_refused = r.add(Counter("meshserve_proxy_retry_budget_exhausted_total",
                                             "Retries not made because the retry budget was spent", ("model",)))
        self.rejected = r.add(Counter("meshserve_proxy_rejected_total",
                                      "Calls answered by the proxy itself with an error, by status", ("reason",)))
        self.streams = r.add(Counter("meshserve_proxy_streams_total",
                                     "ModelStreamInfer upstream streams ended, by status",
                                     ("model", "replica", "code")))
        self.table_version = r.add(Gauge("meshserve_proxy_route_table_version",
                                         "Version of the route table served from (0: none yet)", ()))
        self.endpoints = r.add(Gauge("meshserve_proxy_endpoints",
                                     "Replicas known to the proxy, by whether they are in rotation",
                                     ("in_rotation",)))

    def render(self) -> str:
        return self.registry.render()
