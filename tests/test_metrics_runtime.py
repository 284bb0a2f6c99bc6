"""The runtime's /metrics (runtime/metrics.py): scraped over HTTP after known calls, parsed with
prometheus_client's text parser, and compared with the calls made and with the ModelStatistics RPC."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import RuntimeProcess
from metrics_scrape import Scrape
from test_runtime_helpers import (
    RPC_TIMEOUT_S,
    SERVING,
    infer_request,
    model_stats,
    open_stub,
    rpc_error,
    wait_executing,
    wait_until,
)

SUCCESSES_OF_ONE, SUCCESSES_OF_THREE, FAILURES = 5, 2, 2


@pytest.fixture(scope="module")
def runtime():
    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                              "--model-repository", str(SERVING), "--model", "fragile", "--model", "doubler", "--model", "slow"])
    yield process
    process.stop()


def _metrics_address(process: RuntimeProcess) -> str:
    line = next(line for line in process.output if "listening on" in line)
    return line.split("metrics on http://", 1)[1].split("/metrics", 1)[0]


def test_counters_histogram_and_statistics_agree_with_the_calls(runtime):
    channel, stub = open_stub(runtime.address)
    with channel:
        for _ in range(SUCCESSES_OF_ONE):
            stub.ModelInfer(infer_request("fragile", {"X": np.ones((1, 4), np.float32)}), timeout=RPC_TIMEOUT_S)
        for _ in range(SUCCESSES_OF_THREE):
            stub.ModelInfer(infer_request("fragile", {"X": np.ones((3, 4), np.float32)}), timeout=RPC_TIMEOUT_S)
        for _ in range(FAILURES):
            error = rpc_error(stub.ModelInfer, infer_request("fragile", {"X": -np.ones((1, 4), np.float32)}),
                              timeout=RPC_TIMEOUT_S)
            assert error.code() == grpc.StatusCode.INTERNAL
        stats = model_stats(stub, "fragile")
    scrape = Scrape.of(_metrics_address(runtime))
    fragile = {"model": "fragile", "version": "1"}

    assert scrape.type_of("nv_inference_request_success") == "counter"
    assert scrape.value("nv_inference_request_success", **fragile) == SUCCESSES_OF_ONE + SUCCESSES_OF_THREE == 7
    assert scrape.value("nv_inference_request_failure", **fragile) == FAILURES == 2
    assert scrape.value("nv_inference_count", **fragile) == SUCCESSES_OF_ONE + 3 * SUCCESSES_OF_THREE
    assert scrape.value("nv_inference_exec_count", **fragile) == SUCCESSES_OF_ONE + SUCCESSES_OF_THREE
    assert scrape.value("nv_inference_pending_request_count", **fragile) == 0
    # The same numbers as the ModelStatistics RPC, to the microsecond.
    assert scrape.value("nv_inference_request_success", **fragile) == stats.inference_stats.success.count
    assert scrape.value("nv_inference_request_failure", **fragile) == stats.inference_stats.fail.count
    assert scrape.value("nv_inference_count", **fragile) == stats.inference_count
    assert scrape.value("nv_inference_exec_count", **fragile) == stats.execution_count
    for metric, field in (("nv_inference_request_duration_us", "success"), ("nv_inference_queue_duration_us", "queue"),
                          ("nv_inference_compute_infer_duration_us", "compute_infer")):
        assert scrape.value(metric, **fragile) == getattr(stats.inference_stats, field).ns // 1000 > 0
    # Batch sizes executed: five of 1, two of 3 (the failed batches never completed an execution).
    assert scrape.value("meshserve_runtime_batch_size_bucket", le="1.0", **fragile) == 5
    assert scrape.value("meshserve_runtime_batch_size_bucket", le="2.0", **fragile) == 5
    assert scrape.value("meshserve_runtime_batch_size_bucket", le="4.0", **fragile) == 7
    assert scrape.value("meshserve_runtime_batch_size_bucket", le="+Inf", **fragile) == 7
    assert scrape.value("meshserve_runtime_batch_size_count", **fragile) == 7
    assert scrape.value("meshserve_runtime_batch_size_sum", **fragile) == 11
    # The model nobody called is there, at zero.
    assert scrape.value("nv_inference_request_success", model="doubler", version="1") == 0


def test_pending_requests_count_the_executing_and_the_queued(runtime):
    """One request executing (3 s) and one queued behind it: 2 pending; then 0 once both are answered."""
    slow = {"model": "slow", "version": "1"}
    address = _metrics_address(runtime)
    request = infer_request("slow", {"DELAY_MS": np.full((1, 1), 3000, np.int32)})
    channel, stub = open_stub(runtime.address)
    with channel:
        started = model_stats(stub, "slow").inference_stats.queue.count
        calls = [stub.ModelInfer.future(request, timeout=RPC_TIMEOUT_S) for _ in range(2)]
        wait_executing(stub, "slow", started)
        wait_until(lambda: Scrape.of(address).value("nv_inference_pending_request_count", **slow) == 2,
                   "2 pending requests in /metrics")
        for call in calls:
            call.result()
        assert Scrape.of(address).value("nv_inference_pending_request_count", **slow) == 0


def test_anything_but_get_metrics_is_404_and_the_endpoint_keeps_serving(runtime):
    import urllib.error
    import urllib.request

    address = _metrics_address(runtime)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{address}/other", timeout=10)
    assert err.value.code == 404
    assert "nv_inference_request_success" in Scrape.of(address).families


def test_metrics_on_a_non_loopback_address_need_insecure_metrics():
    import subprocess
    import sys

    from conftest import REPO_ROOT

    result = subprocess.run([sys.executable, "-m", "meshserve.runtime", "--model-repository", str(SERVING),
                             "--metrics-listen", "0.0.0.0:0"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "--metrics-listen 0.0.0.0:0: metrics are plaintext HTTP" in result.stderr
    assert "--insecure-metrics" in result.stderr
