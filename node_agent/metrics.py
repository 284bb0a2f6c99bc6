"""The node agent's ``/metrics`` (``node-agent --metrics-listen``): its GPUs, its replicas, and theirs.

Per GPU (NVML's figures, Triton's names; labels ``node``, ``gpu``, ``gpu_uuid``), sampled at scrape time
from the agent's probe, so ``--fake-gpus`` shows the fake figures the scheduler is told:
``nv_gpu_memory_total_bytes``, ``nv_gpu_memory_used_bytes``, ``nv_gpu_utilization`` (0..1),
``nv_gpu_power_usage`` (watts). Per replica (``node``, ``replica``, ``deployment``):
``meshserve_agent_replica_restarts_total`` and ``meshserve_agent_replicas{state}``.

Replicas' own metrics: with metrics on, every replica serves GET /metrics on loopback (a port it
picks, named in its ready line; node_agent/replica.py), and this endpoint re-exports them with
``replica`` and ``node`` added, so Prometheus scrapes one target per host and needs no discovery of
replica ports. Guarantees of the re-export: each replica is read with a ``REPLICA_SCRAPE_TIMEOUT_S``
deadline and at most ``REPLICA_SCRAPE_MAX_BYTES``, and only on a loopback address (the address is
read from the replica's own output); one that fails or times out is left out (counted in
``meshserve_agent_replica_scrape_errors_total``) and never fails the scrape; only families named
``nv_inference_*`` or ``meshserve_runtime_*`` are taken, and lines that do not parse or already carry a
``replica`` or ``node`` label are dropped (a replica runs a deployment's code and may be hostile).
Hand-written merging because prometheus_client's parser renames Triton's counters ``NAME_total``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from meshserve.common.listen import ListenError, split_address
from meshserve.common.metrics import NODE, REPLICA, render
from meshserve.common.security.tls import is_loopback

from .gpu_probe import GpuProbe, GpuSample
from .replica import ReplicaStatus

log = logging.getLogger(__name__)

REPLICA_SCRAPE_TIMEOUT_S = 2.0
REPLICA_SCRAPE_MAX_BYTES = 4 * 1024 * 1024
_REEXPORTED = re.compile(r"^(nv_inference_|meshserve_runtime_)")
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABELS = re.compile(r'^(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"(?:,(?!$)|$))*$')
_COMMENT = re.compile(r"^# (?P<kind>HELP|TYPE) (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*) ?(?P<text>.*)$")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _AgentCollector(Collector):
    def __init__(self, node: str, statuses: Callable[[], Sequence[ReplicaStatus]]):
        self.node = node
        self.statuses = statuses
        self.gpus: list[GpuSample] = []   # the sample of this scrape (AgentMetrics.render sets it)
        self.scrape_errors: collections.Counter = collections.Counter()

    def collect(self) -> Iterator[Metric]:
        labels = [NODE, "gpu", "gpu_uuid"]
        families = {
            "nv_gpu_memory_total_bytes": GaugeMetricFamily("nv_gpu_memory_total_bytes", "GPU total memory, in bytes",
                                                           labels=labels),
            "nv_gpu_memory_used_bytes": GaugeMetricFamily("nv_gpu_memory_used_bytes", "GPU used memory, in bytes",
                                                          labels=labels),
            "nv_gpu_utilization": GaugeMetricFamily("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)",
                                                    labels=labels),
            "nv_gpu_power_usage": GaugeMetricFamily("nv_gpu_power_usage", "GPU power usage in watts", labels=labels),
        }
        for gpu in self.gpus:
            key = [self.node, str(gpu.index), gpu.uuid]
            families["nv_gpu_memory_total_bytes"].add_metric(key, float(gpu.memory_total_bytes))
            families["nv_gpu_memory_used_bytes"].add_metric(key, float(gpu.memory_used_bytes))
            families["nv_gpu_utilization"].add_metric(key, gpu.utilization_percent / 100.0)
            families["nv_gpu_power_usage"].add_metric(key, gpu.power_watts)
        yield from families.values()
        statuses = list(self.statuses())
        restarts = CounterMetricFamily("meshserve_agent_replica_restarts", "Restarts of a replica's process",
                                       labels=[NODE, REPLICA, "deployment"])
        states: collections.Counter = collections.Counter()
        for status in statuses:
            restarts.add_metric([self.node, status.replica_id, status.deployment], float(status.restarts))
            states[str(getattr(status.state, "value", status.state))] += 1
        yield restarts
        replicas = GaugeMetricFamily("meshserve_agent_replicas", "Replicas on this node by state",
                                     labels=[NODE, "state"])
        for state, count in sorted(states.items()):
            replicas.add_metric([self.node, state], float(count))
        yield replicas
        errors = CounterMetricFamily("meshserve_agent_replica_scrape_errors",
                                     "Reads of a replica's /metrics that failed or timed out",
                                     labels=[NODE, REPLICA])
        for replica, count in sorted(self.scrape_errors.items()):
            errors.add_metric([self.node, replica], float(count))
        yield errors


async def fetch_metrics(address: str) -> str:
    """GET http://ADDRESS/metrics (HTTP/1.1, one request); raises on a non-200 answer or an oversized body."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
    try:
        writer.write(f"GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read(REPLICA_SCRAPE_MAX_BYTES + 1)
        while data and len(data) <= REPLICA_SCRAPE_MAX_BYTES:
            more = await reader.read(REPLICA_SCRAPE_MAX_BYTES + 1 - len(data))
            if not more:
                break
            data += more
    finally:
        writer.close()
    if len(data) > REPLICA_SCRAPE_MAX_BYTES:
        raise ValueError(f"over {REPLICA_SCRAPE_MAX_BYTES} bytes")
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ValueError(f"answered {head.splitlines()[0][:80]!r}" if head else "an empty answer")
    return body.decode("utf-8", "replace")


def _on_loopback(address: str) -> bool:
    """Only a loopback address is scraped: the address comes from the replica's own output."""
    try:
        host, _ = split_address(address)
    except ListenError:
        return False
    return is_loopback(host)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class Families:
    """Re-exported families by name: the first replica's HELP and TYPE lines, every replica's samples."""

    def __init__(self) -> None:
        self.headers: dict[str, dict[str, str]] = {}
        self.samples: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, text: str, extra: dict[str, str]) -> None:
        """Add ``extra`` labels to every re-exportable sample of ``text``; lines that do not parse are dropped."""
        family = None
        added = ",".join(f'{key}="{_escape(value)}"' for key, value in extra.items())
        taken = re.compile(rf'(^|,)\s*({"|".join(map(re.escape, extra))})\s*=')
        for line in text.splitlines():
            comment = _COMMENT.match(line)
            if comment:
                family = comment["name"] if _REEXPORTED.match(comment["name"]) else None
                if family is not None:
                    self.headers.setdefault(family, {}).setdefault(comment["kind"], line)
                continue
            sample = _SAMPLE.match(line)
            if family is None or sample is None or not sample["name"].startswith(family):
                continue
            labels = sample["labels"] or ""
            if taken.search(labels) or not _LABELS.match(labels) or not _is_number(sample["value"]):
                continue
            self.samples[family].append(f'{sample["name"]}{{{added}{"," + labels if labels else ""}}} '
                                        f'{sample["value"]}')

    def text(self) -> str:
        lines = []
        for family, header in self.headers.items():
            lines += [header[kind] for kind in ("HELP", "TYPE") if kind in header] + self.samples[family]
        return "\n".join(lines) + "\n" if lines else ""


class AgentMetrics:
    """One agent's registry plus its replicas' re-exported metrics; ``render`` is a coroutine."""

    def __init__(self, node: str, probe: GpuProbe, supervisor):
        self.node = node
        self.probe = probe
        self.supervisor = supervisor
        self.collector = _AgentCollector(node, supervisor.statuses)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    async def _sample_gpus(self) -> list[GpuSample]:
        try:
            return await self.probe.sample(self.supervisor.gpu_loads())
        except Exception as err:   # a GPU fallen off the bus: no GPU series rather than no metrics
            log.warning("GPU probe %r failed during a metrics scrape: %r", self.probe, err)
            return []

    async def _replica_text(self, status: ReplicaStatus) -> str:
        try:
            async with asyncio.timeout(REPLICA_SCRAPE_TIMEOUT_S):
                return await fetch_metrics(status.metrics_address)
        except (OSError, ValueError, TimeoutError) as err:
            self.collector.scrape_errors[status.replica_id] += 1
            log.debug("replica %s: reading %s/metrics failed: %r", status.replica_id, status.metrics_address, err)
            return ""

    async def render(self) -> str:
        scraped = [status for status in self.supervisor.statuses() if _on_loopback(status.metrics_address)]
        gpus, texts = await asyncio.gather(self._sample_gpus(),
                                           asyncio.gather(*(self._replica_text(s) for s in scraped)))
        self.collector.gpus = gpus
        families = Families()
        for status, text in zip(scraped, texts, strict=True):
            families.add(text, {REPLICA: status.replica_id, NODE: self.node})
        return render(self.registry) + families.text()
