"""common/metrics.py and the agent's re-export (node_agent/metrics.py) on their own: the text written,
the loopback rule, hostile replica output, and a failing collector behind a real HTTP socket."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import pytest
from metrics_scrape import Scrape
from prometheus_client import Counter
from prometheus_client.registry import CollectorRegistry

from meshserve.common.metrics import TritonCounter, check_metrics_listen, render
from meshserve.common.metrics_http import MetricsHttpServer
from meshserve.node_agent.metrics import Families


class _Triton:
    def collect(self):
        family = TritonCounter("nv_inference_request_success", "ok")
        family.add({"model": 'a"b\\c', "version": "1"}, 7)
        yield family
        yield TritonCounter("nv_inference_request_failure", "failed")   # no samples: still unsuffixed


def test_triton_counters_keep_their_names_and_others_end_in_total():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Triton())
    Counter("meshserve_things", "things", registry=registry).inc(2)
    Counter("meshserve_unused", "no samples", ["op"], registry=registry)
    text = render(registry)
    assert "# TYPE nv_inference_request_success counter\n" in text
    assert 'nv_inference_request_success{model="a\\"b\\\\c",version="1"} 7.0\n' in text
    assert "# TYPE nv_inference_request_failure counter\n" in text
    assert "# TYPE meshserve_things_total counter\nmeshserve_things_total 2.0\n" in text
    assert "# TYPE meshserve_unused_total counter\n" in text
    assert "_created" not in text
    scrape = Scrape(text)
    assert scrape.value("nv_inference_request_success", model='a"b\\c') == 7
    assert scrape.value("meshserve_things") == 2


@pytest.mark.parametrize("address", ["127.0.0.1:0", "[::1]:9000", "localhost:9100"])
def test_loopback_metrics_need_no_flag(address):
    check_metrics_listen(address, insecure=False)


@pytest.mark.parametrize("address,message", [("0.0.0.0:9100", "loopback only unless --insecure-metrics"),
                                             ("10.0.0.5:9100", "loopback only unless --insecure-metrics"),
                                             ("127.0.0.1", "expected HOST:PORT"),
                                             ("127.0.0.1:99999", "expected HOST:PORT")])
def test_other_metrics_addresses_are_refused(address, message):
    with pytest.raises(ValueError, match=message):
        check_metrics_listen(address, insecure=False)


def test_insecure_metrics_allows_any_address():
    check_metrics_listen("0.0.0.0:9100", insecure=True)


def test_a_hostile_replica_cannot_forge_labels_families_or_break_the_text():
    families = Families()
    families.add("# HELP nv_inference_count n\n# TYPE nv_inference_count counter\n"
                 'nv_inference_count{model="a",version="1"} 3\n'
                 'nv_inference_count{replica="someone-else",model="a"} 9\n'
                 'nv_inference_count{node="x"} 9\n'
                 'nv_inference_count{model="a"} NaNx\n'
                 'nv_inference_count{model="a""} 5\n'
                 'nv_inference_count{model="a"} 1\n\n'
                 "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1\n"
                 "nv_inference_count 8\n" + "garbage line\n" * 3,
                 {"replica": "r1", "node": "n1"})
    families.add("# HELP nv_inference_count other help\n# TYPE nv_inference_count counter\n"
                 'nv_inference_count{model="a",version="1"} 4\n', {"replica": "r2", "node": "n1"})
    text = families.text()
    assert text.count("# TYPE nv_inference_count counter") == 1
    scrape = Scrape(text)
    assert [(s.labels["replica"], s.value) for s in scrape.samples("nv_inference_count")] == [
        ("r1", 3), ("r1", 1), ("r2", 4)]
    assert "process_cpu" not in text and "someone-else" not in text


def test_a_failing_collector_answers_500_and_the_endpoint_keeps_serving():
    calls = []

    def render_text() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("collector bug")
        return "# TYPE up gauge\nup 1\n"

    async def scenario():
        server = MetricsHttpServer("127.0.0.1:0", render_text)
        await server.start()
        try:
            def get(path):
                return urllib.request.urlopen(f"http://{server.address}{path}", timeout=10)
            with pytest.raises(urllib.error.HTTPError) as failed:
                await asyncio.to_thread(get, "/metrics")
            assert failed.value.code == 500
            response = await asyncio.to_thread(get, "/metrics")
            assert response.read() == b"# TYPE up gauge\nup 1\n"
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_the_agent_scrapes_replicas_only_on_loopback():
    from meshserve.node_agent.metrics import _on_loopback

    assert _on_loopback("127.0.0.1:9100") and _on_loopback("[::1]:9100")
    for claimed in ("10.0.0.1:9100", "example.invalid:80", "", "no-port"):   # a replica's output is a claim
        assert not _on_loopback(claimed)


def test_agent_gpu_metrics_are_the_probes_figures_on_real_gpus():
    """On a host with NVML: what /metrics says per GPU is what NVML said in the same sample."""
    pytest.importorskip("pynvml")
    from test_node_agent_gpu_probe import nvml_available

    from meshserve.node_agent.gpu_probe import NvmlProbe
    from meshserve.node_agent.metrics import _AgentCollector

    if not nvml_available():
        pytest.skip("no NVML (no GPU or driver) on this machine")
    probe = NvmlProbe.open()
    try:
        collector = _AgentCollector("gpu-host", lambda: [])
        collector.gpus = probe.sample_now()
    finally:
        probe.close()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    scrape = Scrape(render(registry))
    for gpu in collector.gpus:
        labels = {"node": "gpu-host", "gpu": str(gpu.index), "gpu_uuid": gpu.uuid}
        assert scrape.value("nv_gpu_memory_total_bytes", **labels) == gpu.memory_total_bytes
        assert scrape.value("nv_gpu_memory_used_bytes", **labels) == gpu.memory_used_bytes
        assert scrape.value("nv_gpu_utilization", **labels) == gpu.utilization_percent / 100
        assert scrape.value("nv_gpu_power_usage", **labels) == gpu.power_watts
