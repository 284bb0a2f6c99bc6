"""The proxy in front of REAL runtime replicas on loopback, following an in-test RouteService.

Replicas are ``python -m meshserve.runtime`` processes (conftest); the route source is
``FakeRoutes``, a real grpc.aio RouteService the test publishes tables on.
Which replica served a call is read from each replica's own statistics.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from conftest import EXAMPLES, REPO_ROOT, RuntimeProcess, wait_for_line
from test_proxy_helpers import RPC_TIMEOUT_S, FakeRoutes, ProxyRig, route
from test_runtime_helpers import (
    SERVING,
    add_sub_inputs,
    assert_status,
    check_add_sub,
    decode_outputs,
    expected_tokens,
    infer_request,
    open_stub,
    rpc_error,
)

from meshserve.protos.inference import grpc_service_pb2 as pb

END = object()


def _start_replicas(count: int, *args: str) -> list[RuntimeProcess]:
    """``count`` runtimes started side by side (each start waits for its ready line)."""
    started: list[RuntimeProcess] = [None] * count
    errors = []

    def start(i):
        try:
            started[i] = RuntimeProcess(["--listen", "127.0.0.1:0", *args])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
    threads = [threading.Thread(target=start, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for process in started:
            if process:
                process.stop()
        raise errors[0]
    return started


@pytest.fixture(scope="module")
def replicas():
    """Three replicas serving add_sub and textgen."""
    processes = _start_replicas(3, "--model-repository", str(EXAMPLES), "--model", "add_sub", "--model", "textgen")
    yield processes
    for process in processes:
        process.stop()


@pytest.fixture(scope="module")
def rig(loop, replicas):
    """One proxy over the three replicas (add_sub, textgen), 1 MiB message limit."""
    endpoints = [(f"r{i}", p.address) for i, p in enumerate(replicas)]
    proxy_rig = ProxyRig(loop, route("add_sub", *endpoints), route("textgen", *endpoints),
                         max_message_bytes=1024 * 1024)
    yield proxy_rig
    proxy_rig.close()


@pytest.fixture(scope="module")
def stub(rig):
    channel, stub = open_stub(rig.address)
    yield stub
    channel.close()


def _direct_stats(process: RuntimeProcess, model: str) -> pb.ModelStatistics:
    channel, direct = open_stub(process.address)
    with channel:
        return direct.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=RPC_TIMEOUT_S).model_stats[0]


def _successes(processes: list[RuntimeProcess], model: str = "add_sub") -> list[int]:
    return [_direct_stats(p, model).inference_stats.success.count for p in processes]


def _hammer(stub, calls: int, workers: int) -> None:
    """``calls`` add_sub calls, ``workers`` at a time, each checked."""
    def work(n):
        for i in range(n):
            check_add_sub(stub, seed=i)
    threads = [threading.Thread(target=work, args=(calls // workers,)) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- load balancing -------------------------------------------------------------------------------


def test_calls_spread_across_three_replicas(stub, replicas):
    before = _successes(replicas)
    _hammer(stub, 300, workers=6)
    served = [after - b for after, b in zip(_successes(replicas), before, strict=True)]
    assert sum(served) == 300
    assert all(count >= 60 for count in served), served   # each >= 20 % of the calls


def test_weights_90_10_split_traffic_between_two_routes(loop, replicas):
    a, b = replicas[0], replicas[1]
    rig = ProxyRig(loop, route("add_sub", ("r-a", a.address), weight=90, deployment="stable"),
                   route("add_sub", ("r-b", b.address), weight=10, deployment="canary"))
    try:
        channel, stub = open_stub(rig.address)
        with channel:
            before = _successes([a, b])
            _hammer(stub, 1000, workers=8)
            served = [after - x for after, x in zip(_successes([a, b]), before, strict=True)]
    finally:
        rig.close()
    assert sum(served) == 1000
    # Binomial(1000, 0.1): mean 100, sd 9.5; the band is more than 4 sd wide each side.
    assert 60 <= served[1] <= 140, served


# -- streaming ------------------------------------------------------------------------------------


def _textgen(prompt: str, max_tokens: int, request_id: str = "") -> pb.ModelInferRequest:
    return infer_request("textgen", {"PROMPT": np.array([prompt.encode()], dtype=object),
                                     "MAX_TOKENS": np.array([max_tokens], np.int32)},
                         datatypes={"PROMPT": "BYTES"}, request_id=request_id)


def test_stream_yields_every_token_in_order_with_the_final_flag(stub):
    responses = list(stub.ModelStreamInfer(iter([_textgen("Through the proxy", 12, "t1")]),
                                           timeout=RPC_TIMEOUT_S))
    assert not any(r.error_message for r in responses)
    tokens = [decode_outputs(r.infer_response)["TOKEN"][0].decode() for r in responses]
    assert tokens == expected_tokens("Through the proxy", 12)
    finals = [r.infer_response.parameters["triton_final_response"].bool_param for r in responses]
    assert finals == [False] * 11 + [True]
    assert {r.infer_response.id for r in responses} == {"t1"}


def test_unknown_model_in_a_stream_is_answered_in_the_stream_and_the_stream_goes_on(stub):
    responses = list(stub.ModelStreamInfer(iter([infer_request("nope", {}, request_id="x"),
                                                 _textgen("After", 2, "t2")]), timeout=RPC_TIMEOUT_S))
    errors = [r for r in responses if r.error_message]
    assert len(errors) == 1 and errors[0].error_message.startswith("NOT_FOUND") and "nope" in errors[0].error_message
    assert errors[0].infer_response.id == "x"
    assert len(responses) == 3


TICKS = 10_000   # a stream this long cannot finish during the test
TICK_MS = 5


def _ticks(count: int, request_id: str) -> pb.ModelInferRequest:
    return infer_request("ticker", {"COUNT": np.array([count], np.int32),
                                    "TICK_MS": np.array([TICK_MS], np.int32)}, request_id=request_id)


def test_cancelling_a_stream_at_the_client_cancels_it_at_the_replica(loop, start_runtime):
    ticker = start_runtime("--model-repository", SERVING, "--model", "ticker")
    rig = ProxyRig(loop, route("ticker", ("tick-0", ticker.address)))
    channel, stub = open_stub(rig.address)
    try:
        requests: queue.Queue = queue.Queue()

        def request_iterator():
            while (request := requests.get(timeout=RPC_TIMEOUT_S)) is not END:
                yield request

        call = stub.ModelStreamInfer(request_iterator(), timeout=RPC_TIMEOUT_S)
        requests.put(_ticks(TICKS, "long"))
        assert [decode_outputs(next(call).infer_response)["TICK"].tolist() for _ in range(3)] == [[0], [1], [2]]
        call.cancel()
        requests.put(END)
        with pytest.raises(grpc.RpcError) as info:
            for _ in range(TICKS):
                next(call)
        assert info.value.code() == grpc.StatusCode.CANCELLED

        # The replica's one instance is free again and the cancelled generator stopped producing.
        responses = list(stub.ModelStreamInfer(iter([_ticks(2, "after")]), timeout=RPC_TIMEOUT_S))
        assert [decode_outputs(r.infer_response)["TICK"].tolist() for r in responses] == [[0], [1]]
        produced_by_cancelled = int(decode_outputs(responses[0].infer_response)["PRODUCED"][0]) - 1
        assert 3 <= produced_by_cancelled < 1000
        pending = loop.call(lambda: rig.proxy.metrics.pending.labels("ticker", "", "tick-0").value)
        assert pending == 0
    finally:
        channel.close()
        rig.close()


# -- failures -------------------------------------------------------------------------------------


def test_kill_9_of_a_replica_under_load_fails_no_call(loop, start_runtime):
    victims = [start_runtime("--model-repository", EXAMPLES, "--model", "add_sub") for _ in range(3)]
    rig = ProxyRig(loop, route("add_sub", *[(f"k{i}", p.address) for i, p in enumerate(victims)]))
    channel, stub = open_stub(rig.address)
    failures, calls = [], [0]
    stop = threading.Event()

    def work(worker):
        i = 0
        while not stop.is_set():
            try:
                check_add_sub(stub, seed=worker * 100_000 + i)
                calls[0] += 1
            except Exception as err:  # noqa: BLE001 - counted and reported
                failures.append(err)
            i += 1
    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)   # the load runs; the kill lands in the middle of it
        served_before = loop.call(lambda: rig.proxy.metrics.success.labels("add_sub", "", "k0").value)
        victims[0].proc.kill()
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(RPC_TIMEOUT_S)
        retries = loop.call(lambda: rig.proxy.metrics.retries.labels("add_sub", "UNAVAILABLE").value)
        in_rotation = loop.call(lambda: rig.proxy.pool.get(victims[0].address).healthy)
    finally:
        stop.set()
        channel.close()
        rig.close()
    assert served_before > 0          # the victim was taking traffic when it died
    assert failures == [], f"{len(failures)} of {calls[0]} calls failed: {failures[:3]}"
    assert not in_rotation
    print(f"kill -9 under load: {calls[0]} calls, 0 failed, {int(retries)} retried")


def test_the_proxy_keeps_serving_its_last_table_when_the_route_source_is_gone(loop, replicas):
    rig = ProxyRig(loop, route("add_sub", ("r0", replicas[0].address)))
    channel, stub = open_stub(rig.address)
    try:
        loop.run(rig.routes.stop())
        time.sleep(0.5)   # the watch breaks and the follower starts retrying; nothing to await from outside
        for seed in range(20):
            check_add_sub(stub, seed=seed)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=RPC_TIMEOUT_S).ready
    finally:
        channel.close()
        loop.run(rig.proxy.stop(0))


def test_unknown_model_is_not_found_naming_it(stub):
    error = rpc_error(stub.ModelInfer, infer_request("no_such_model", add_sub_inputs()))
    assert_status(error, grpc.StatusCode.NOT_FOUND, "no_such_model")
    error = rpc_error(stub.ModelConfig, pb.ModelConfigRequest(name="no_such_model"))
    assert_status(error, grpc.StatusCode.NOT_FOUND, "no_such_model")


def test_oversize_message_is_resource_exhausted(stub):
    request = pb.ModelInferRequest(model_name="add_sub", raw_input_contents=[b"\x00" * (2 * 1024 * 1024)])
    assert_status(rpc_error(stub.ModelInfer, request), grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_malformed_request_is_invalid_argument(rig):
    with grpc.insecure_channel(rig.address) as channel:
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\x0a\x40add_sub", timeout=RPC_TIMEOUT_S)
    assert_status(info.value, grpc.StatusCode.INVALID_ARGUMENT, "malformed")


def test_replica_errors_pass_through_unchanged(stub):
    request = infer_request("add_sub", {"INPUT0": np.zeros((1, 3), np.float32),
                                        "INPUT1": np.zeros((1, 3), np.float32)})
    error = rpc_error(stub.ModelInfer, request)
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "INPUT0")


# -- the proxy's own answers ----------------------------------------------------------------------


def test_statistics_are_summed_over_the_replicas(stub, replicas):
    _hammer(stub, 30, workers=3)
    direct = [_direct_stats(p, "add_sub") for p in replicas]
    total = stub.ModelStatistics(pb.ModelStatisticsRequest(name="add_sub"), timeout=RPC_TIMEOUT_S).model_stats
    assert len(total) == 1 and total[0].name == "add_sub"
    success = total[0].inference_stats.success
    assert success.count == sum(d.inference_stats.success.count for d in direct) >= 30
    assert success.ns == sum(d.inference_stats.success.ns for d in direct)
    assert total[0].inference_count == sum(d.inference_count for d in direct)
    assert total[0].last_inference == max(d.last_inference for d in direct)
    everything = stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=RPC_TIMEOUT_S).model_stats
    assert sorted(s.name for s in everything) == ["add_sub", "textgen"]


def test_readiness_metadata_config_and_index(stub):
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=RPC_TIMEOUT_S).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=RPC_TIMEOUT_S).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="add_sub"), timeout=RPC_TIMEOUT_S).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=RPC_TIMEOUT_S).ready
    config = stub.ModelConfig(pb.ModelConfigRequest(name="add_sub"), timeout=RPC_TIMEOUT_S).config
    assert config.name == "add_sub" and config.max_batch_size == 64
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="textgen"), timeout=RPC_TIMEOUT_S)
    assert [i.name for i in metadata.inputs] == ["PROMPT", "MAX_TOKENS"]
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=RPC_TIMEOUT_S)
    assert sorted((m.name, m.state) for m in index.models) == [("add_sub", "READY"), ("textgen", "READY")]
    error = rpc_error(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="add_sub"))
    assert_status(error, grpc.StatusCode.FAILED_PRECONDITION, "proxy", "scheduler")


def test_metrics_endpoint_serves_prometheus_text(stub, rig):
    check_add_sub(stub)
    wrong = np.zeros((1, 3), np.float32)   # add_sub takes 16 values: the replica refuses it
    refusals = ((infer_request("add_sub", {"INPUT0": wrong, "INPUT1": wrong}), grpc.StatusCode.INVALID_ARGUMENT),
                (infer_request("no_such_model", {}), grpc.StatusCode.NOT_FOUND))
    for request, code in refusals:
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
        assert refused.value.code() == code
    url = f"http://{rig.proxy.metrics_address}/metrics"
    with urllib.request.urlopen(url, timeout=RPC_TIMEOUT_S) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    for name in ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                 "nv_inference_pending_request_count", "nv_inference_request_duration_us",
                 "meshserve_proxy_request_duration_seconds", "meshserve_proxy_retries_total",
                 "meshserve_proxy_route_table_version", "meshserve_proxy_endpoints"):
        assert f"# TYPE {name} " in text, name
    assert re.search(r'nv_inference_request_success\{model="add_sub",version="",replica="r\d"\} [1-9]', text)
    assert re.search(r'nv_inference_request_failure\{model="add_sub",version="",replica="r\d",'
                     r'reason="INVALID_ARGUMENT"\} [1-9]', text)
    assert 'meshserve_proxy_rejected_total{reason="NOT_FOUND"}' in text
    assert 'meshserve_proxy_endpoints{in_rotation="true"} 3' in text
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=RPC_TIMEOUT_S)
    assert info.value.code == 404


# -- Triton's own client, through the CLI ---------------------------------------------------------

TRITON_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc

client = tc.InferenceServerClient(sys.argv[1])
out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
       "model_ready": client.is_model_ready("add_sub")}
out["server"] = client.get_server_metadata(as_json=True)["name"]
out["inputs"] = [i["name"] for i in client.get_model_metadata("add_sub", as_json=True)["inputs"]]
out["max_batch_size"] = client.get_model_config("add_sub", as_json=True)["config"]["max_batch_size"]
a = np.arange(16, dtype=np.float32).reshape(1, 16)
inputs = [tc.InferInput("INPUT0", [1, 16], "FP32"), tc.InferInput("INPUT1", [1, 16], "FP32")]
inputs[0].set_data_from_numpy(a); inputs[1].set_data_from_numpy(a)
result = client.infer("add_sub", inputs)
out["sum_ok"] = bool((result.as_numpy("OUTPUT0") == 2 * a).all())
stats = client.get_inference_statistics("add_sub", as_json=True)["model_stats"][0]
out["success"] = int(stats["inference_stats"]["success"]["count"])
out["index"] = sorted(m["name"] for m in client.get_model_repository_index(as_json=True)["models"])
tokens = []
client.start_stream(callback=lambda result, error: tokens.append(error or result.as_numpy("TOKEN")[0].decode()))
prompt = tc.InferInput("PROMPT", [1], "BYTES"); prompt.set_data_from_numpy(np.array([b"Triton says"], dtype=object))
count = tc.InferInput("MAX_TOKENS", [1], "INT32"); count.set_data_from_numpy(np.array([5], np.int32))
client.async_stream_infer("textgen", [prompt, count])
client.stop_stream()
out["tokens"] = [str(t) for t in tokens]
try:
    client.infer("missing_model", inputs)
except tc.InferenceServerException as err:
    out["missing"] = [err.status(), err.message()]
print(json.dumps(out))
"""


def test_tritonclient_works_through_the_proxy_cli(loop, replicas, tmp_path):
    routes = FakeRoutes()   # only the route source runs in-process: the proxy is the CLI
    loop.run(routes.start())
    endpoints = [(f"r{i}", p.address) for i, p in enumerate(replicas)]
    loop.run(routes.publish(route("add_sub", *endpoints), route("textgen", *endpoints)))
    # 127.0.0.1:1 first: a dead scheduler address is skipped.
    proxy = subprocess.Popen([sys.executable, "-m", "meshserve.proxy", "--scheduler", f"127.0.0.1:1,{routes.address}",
                              "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"],
                             cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        match = wait_for_line(proxy, r"meshserve proxy listening on (\S+:\d+)")
        assert match, "the proxy did not start"
        script = tmp_path / "triton_through_proxy.py"
        script.write_text(TRITON_SCRIPT)
        done = subprocess.run([sys.executable, str(script), match.group(1)], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        proxy.terminate()
        proxy.wait(20)
        loop.run(routes.stop())
    assert out["live"] and out["ready"] and out["model_ready"]
    assert out["server"] == "meshserve" and out["inputs"] == ["INPUT0", "INPUT1"] and out["max_batch_size"] == 64
    assert out["sum_ok"] and out["success"] >= 1
    assert out["index"] == ["add_sub", "textgen"]
    assert out["tokens"] == expected_tokens("Triton says", 5)
    assert out["missing"][0] == "StatusCode.NOT_FOUND" and "missing_model" in out["missing"][1]
    assert proxy.returncode == 0


def test_streams_that_end_or_are_cancelled_log_no_error(stub, caplog):
    """The proxy's span for a stream must not outlive the context it was made in: a stream ending (or a
    client cancelling one) used to log OpenTelemetry's "Failed to detach context" with a traceback."""
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            list(stub.ModelStreamInfer(iter([_textgen("Ends", 3)]), timeout=RPC_TIMEOUT_S))
            call = stub.ModelStreamInfer(iter([_textgen("Cancelled", 50)]), timeout=RPC_TIMEOUT_S)
            next(call)
            call.cancel()
        time.sleep(0.5)   # the proxy's handlers finish on its own loop
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
