"""deploy/grafana/meshserve.json queries only metrics the daemons export, and the exporters' text
parses with Prometheus' own parser. The names come from the real collectors of each daemon, rendered."""

from __future__ import annotations

import json
import re

from conftest import REPO_ROOT
from prometheus_client.parser import text_string_to_metric_families

from meshserve.common.metrics import render
from meshserve.node_agent.gpu_probe import FakeProbe
from meshserve.node_agent.metrics import _AgentCollector
from meshserve.proxy.metrics import ProxyMetrics
from meshserve.runtime.metrics import runtime_registry
from meshserve.runtime.statistics import ModelStatisticsRecorder
from meshserve.scheduler.metrics import SchedulerMetrics

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "meshserve.json"
METRIC_NAME = re.compile(r"\b((?:nv|meshserve)_[a-zA-Z0-9_:]+)")


class _Served:
    def __init__(self):
        self.stats = ModelStatisticsRecorder("m", "1")
        self.stats.record_batch(1, 4, 10, 20, 30)
        self.pending_requests = 0


def exported_texts() -> list[str]:
    from prometheus_client.registry import CollectorRegistry

    agent = _AgentCollector("node-a", lambda: [])
    agent.gpus = FakeProbe("1x24GiB").sample_now()
    agent_registry = CollectorRegistry(auto_describe=False)
    agent_registry.register(agent)
    scheduler = SchedulerMetrics(lambda: None)
    scheduler.reconcile_seconds.observe(0.001)
    scheduler.store_seconds.labels("put").observe(0.001)
    proxy = ProxyMetrics()
    proxy.latency.labels("m", "1").observe(0.01)
    return [render(runtime_registry(lambda: [_Served()])), render(agent_registry), render(scheduler.registry),
            proxy.render()]


def exported_names() -> set[str]:
    """Every sample name a query can use: declared families, and a histogram's _bucket/_sum/_count."""
    names = set()
    for text in exported_texts():
        for kind_line in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
            name, kind = kind_line
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        list(text_string_to_metric_families(text))   # parses, or raises
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_metric_the_dashboard_queries_is_exported():
    exported = exported_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    queried = set()
    for expr in exprs:
        names = set(METRIC_NAME.findall(expr))
        assert names, f"no meshserve or Triton metric in {expr!r}"
        queried |= names
    assert queried - exported == set(), f"queried but exported by no daemon: {sorted(queried - exported)}"
    # What the issue asks the dashboard to show is there.
    for needed in ("nv_inference_request_success", "meshserve_proxy_request_duration_seconds_bucket",
                   "nv_inference_pending_request_count", "nv_gpu_memory_used_bytes", "meshserve_scheduler_replicas"):
        assert needed in queried


def test_a_misspelt_metric_would_be_caught():
    assert "nv_inference_request_sucess" not in exported_names()
    assert {"nv_inference_request_success", "nv_gpu_memory_total_bytes", "meshserve_scheduler_placements_total",
            "meshserve_agent_replica_restarts_total", "meshserve_runtime_batch_size_bucket"} <= exported_names()
