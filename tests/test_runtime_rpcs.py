"""Every RPC of the runtime against one real server of examples/models (port 0).

Plus grpc.health.v1, the RPCs the runtime does not implement, and Triton's own
``tritonclient.grpc`` client, run in a child process because it cannot be
imported next to ``protos.inference`` (both register ``inference.*``).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_runtime_helpers import (
    EXAMPLES,
    REPO_ROOT,
    RPC_TIMEOUT_S,
    assert_status,
    check_add_sub,
    decode_outputs,
    expected_tokens,
    infer_request,
    load_module,
    model_stats,
    open_stub,
    rpc_error,
)

from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import model_config_pb2 as mc

SERVICE = "inference.GRPCInferenceService"


@pytest.fixture(scope="module")
def connection(examples_runtime):
    channel, stub = open_stub(examples_runtime.address)
    yield channel, stub
    channel.close()


@pytest.fixture
def channel(connection):
    return connection[0]


@pytest.fixture
def stub(connection):
    return connection[1]


def test_server_live_and_ready(stub):
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=RPC_TIMEOUT_S).live is True
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=RPC_TIMEOUT_S).ready is True


@pytest.mark.parametrize("name, version, ready", [
    ("add_sub", "", True),
    ("add_sub", "1", True),
    ("add_sub", "2", False),  # no such version
    ("mlp_onnx", "", True),
    ("textgen", "", True),
    ("no_such_model", "", False),
    ("resnet50_torch", "", importlib.util.find_spec("torch") is not None),
])
def test_model_ready(stub, name, version, ready):
    response = stub.ModelReady(pb.ModelReadyRequest(name=name, version=version), timeout=RPC_TIMEOUT_S)
    assert response.ready is ready


def test_server_metadata_lists_only_implemented_extensions(stub):
    response = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=RPC_TIMEOUT_S)
    assert response.name == "meshserve"
    assert response.version
    extensions = set(response.extensions)
    assert {"model_repository", "model_configuration", "statistics", "classification"} <= extensions
    # Unimplemented RPC families must not be advertised.
    assert not extensions & {"cuda_shared_memory", "sequence", "trace", "logging"}


def test_model_metadata_has_batch_axis_when_batching(stub):
    response = stub.ModelMetadata(pb.ModelMetadataRequest(name="add_sub"), timeout=RPC_TIMEOUT_S)
    assert response.name == "add_sub"
    assert list(response.versions) == ["1"]
    assert response.platform == "python"
    assert [(t.name, t.datatype, list(t.shape)) for t in response.inputs] == [
        ("INPUT0", "FP32", [-1, 16]), ("INPUT1", "FP32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        ("OUTPUT0", "FP32", [-1, 16]), ("OUTPUT1", "FP32", [-1, 16])]


def test_model_metadata_without_batching_has_no_batch_axis(stub):
    response = stub.ModelMetadata(pb.ModelMetadataRequest(name="echo_bytes"), timeout=RPC_TIMEOUT_S)
    assert [(t.name, t.datatype, list(t.shape)) for t in response.inputs] == [("INPUT0", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [("OUTPUT0", "BYTES", [-1])]


def test_model_metadata_of_onnx_model_comes_from_the_graph(stub):
    response = stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp_onnx", version="1"),
                                  timeout=RPC_TIMEOUT_S)
    assert response.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in response.inputs] == [("INPUT", "FP32", [-1, 8])]
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [("OUTPUT", "FP32", [-1, 4])]


@pytest.mark.parametrize("call, request_type", [
    ("ModelMetadata", pb.ModelMetadataRequest),
    ("ModelConfig", pb.ModelConfigRequest),
    ("ModelStatistics", pb.ModelStatisticsRequest),
])
def test_model_rpcs_on_unknown_model_are_not_found(stub, call, request_type):
    error = rpc_error(getattr(stub, call), request_type(name="no_such_model"))
    assert_status(error, grpc.StatusCode.NOT_FOUND, "no_such_model")


def test_model_config_of_minimal_onnx_config_is_completed_from_the_graph(stub):
    config = stub.ModelConfig(pb.ModelConfigRequest(name="mlp_onnx"), timeout=RPC_TIMEOUT_S).config
    assert config.name == "mlp_onnx"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 32
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("INPUT", mc.TYPE_FP32, [8])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("OUTPUT", mc.TYPE_FP32, [4])]
    assert config.HasField("dynamic_batching")


def test_model_config_of_python_model_is_its_config_pbtxt(stub):
    config = stub.ModelConfig(pb.ModelConfigRequest(name="textgen"), timeout=RPC_TIMEOUT_S).config
    assert config.backend == "python"
    assert config.model_transaction_policy.decoupled is True
    assert [t.name for t in config.input] == ["PROMPT", "MAX_TOKENS"]
    assert config.input[1].optional is True
    assert config.parameters["order"].string_value == "4"


def test_onnx_model_infers_like_the_reference_forward_pass(stub):
    build = load_module(EXAMPLES / "mlp_onnx" / "build.py", "mlp_onnx_build")
    x = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    response = stub.ModelInfer(infer_request("mlp_onnx", {"INPUT": x}), timeout=RPC_TIMEOUT_S)
    assert response.model_name == "mlp_onnx" and response.model_version == "1"
    out = decode_outputs(response)["OUTPUT"]
    assert out.shape == (5, 4)
    np.testing.assert_allclose(out, build.reference_forward(x), rtol=1e-5, atol=1e-5)


def test_infer_answers_with_model_version_and_request_id(stub):
    inputs = {"INPUT0": np.ones((2, 16), np.float32), "INPUT1": np.full((2, 16), 3, np.float32)}
    response = stub.ModelInfer(infer_request("add_sub", inputs, request_id="req-42", version="1"),
                               timeout=RPC_TIMEOUT_S)
    assert (response.model_name, response.model_version, response.id) == ("add_sub", "1", "req-42")
    outputs = decode_outputs(response)
    np.testing.assert_array_equal(outputs["OUTPUT0"], np.full((2, 16), 4, np.float32))
    np.testing.assert_array_equal(outputs["OUTPUT1"], np.full((2, 16), -2, np.float32))


def test_classification_extension_answers_top_k_labels(stub):
    inputs = {"INPUT0": np.arange(16, dtype=np.float32)[None, :], "INPUT1": np.zeros((1, 16), np.float32)}
    request = infer_request("add_sub", inputs)
    request.outputs.add(name="OUTPUT0").parameters["classification"].int64_param = 2
    response = stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [("OUTPUT0", "BYTES", [1, 2])]
    top = decode_outputs(response)["OUTPUT0"]
    assert [item.split(b":")[1] for item in top[0]] == [b"15", b"14"]


def test_model_statistics_count_requests_and_durations_in_nanoseconds(stub):
    before = model_stats(stub, "add_sub")
    requests = 4
    started = time.perf_counter_ns()
    for seed in range(requests):
        check_add_sub(stub, batch=2, seed=seed)
    elapsed_ns = time.perf_counter_ns() - started
    after = model_stats(stub, "add_sub")

    assert (after.name, after.version) == ("add_sub", "1")
    assert after.inference_count - before.inference_count == 2 * requests
    # Sequential requests cannot share a batch: one execution each.
    assert after.execution_count - before.execution_count == requests
    assert after.last_inference > 0
    for field in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        grown = getattr(after.inference_stats, field).count - getattr(before.inference_stats, field).count
        assert grown == requests, field
    success_ns = after.inference_stats.success.ns - before.inference_stats.success.ns
    infer_ns = after.inference_stats.compute_infer.ns - before.inference_stats.compute_infer.ns
    # Nanoseconds: the server-side time is positive, within the client's round trips,
    # and includes the predictor's compute time.
    assert 0 < infer_ns <= success_ns <= elapsed_ns
    assert after.inference_stats.fail.count == before.inference_stats.fail.count
    batch_sizes = {batch.batch_size: batch for batch in after.batch_stats}
    assert 2 in batch_sizes
    assert batch_sizes[2].compute_infer.count >= requests
    assert batch_sizes[2].compute_infer.ns > 0


def test_model_statistics_without_name_cover_every_ready_model(stub):
    response = stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=RPC_TIMEOUT_S)
    names = {stats.name for stats in response.model_stats}
    assert {"add_sub", "echo_bytes", "mlp_onnx", "textgen"} <= names
    error = rpc_error(stub.ModelStatistics, pb.ModelStatisticsRequest(version="1"))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "version")


def test_repository_index_reports_every_model_with_state_and_reason(stub):
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=RPC_TIMEOUT_S)
    rows = {model.name: model for model in index.models}
    assert set(rows) == {"add_sub", "echo_bytes", "mlp_onnx", "resnet50_torch", "textgen"}
    for name in ("add_sub", "echo_bytes", "mlp_onnx", "textgen"):
        assert (rows[name].state, rows[name].version) == ("READY", "1"), rows[name]
    ready_only = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=RPC_TIMEOUT_S)
    ready_names = {model.name for model in ready_only.models}
    assert {"add_sub", "echo_bytes", "mlp_onnx", "textgen"} <= ready_names


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed here")
def test_repository_index_explains_why_resnet50_torch_is_unavailable_without_torch(stub):
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=RPC_TIMEOUT_S)
    resnet = next(model for model in index.models if model.name == "resnet50_torch")
    assert resnet.state == "UNAVAILABLE"
    assert "torch" in resnet.reason
    ready_only = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=RPC_TIMEOUT_S)
    assert "resnet50_torch" not in {model.name for model in ready_only.models}
    error = rpc_error(stub.ModelInfer, infer_request(
        "resnet50_torch", {"INPUT": np.zeros((1, 3, 224, 224), np.float32)}))
    assert_status(error, grpc.StatusCode.UNAVAILABLE, "resnet50_torch", "torch")


def test_repository_rpcs_refuse_a_named_repository(stub):
    error = rpc_error(stub.RepositoryIndex, pb.RepositoryIndexRequest(repository_name="elsewhere"))
    assert_status(error, grpc.StatusCode.NOT_FOUND, "elsewhere")


@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_check_serves(channel, service):
    health = health_pb2_grpc.HealthStub(channel)
    response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_check_of_unknown_service_is_not_found(channel):
    health = health_pb2_grpc.HealthStub(channel)
    error = rpc_error(health.Check, health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("call, request_type, what", [
    ("CudaSharedMemoryStatus", pb.CudaSharedMemoryStatusRequest, "CUDA shared memory"),
    ("CudaSharedMemoryRegister", pb.CudaSharedMemoryRegisterRequest, "CUDA shared memory"),
    ("CudaSharedMemoryUnregister", pb.CudaSharedMemoryUnregisterRequest, "CUDA shared memory"),
    ("TraceSetting", pb.TraceSettingRequest, "TraceSetting"),
    ("LogSettings", pb.LogSettingsRequest, "LogSettings"),
])
def test_unimplemented_rpcs_answer_unimplemented_with_a_message(stub, call, request_type, what):
    error = rpc_error(getattr(stub, call), request_type())
    assert_status(error, grpc.StatusCode.UNIMPLEMENTED, what, "not implemented")
    check_add_sub(stub)  # and the server still serves


# Runs in a child process: tritonclient.grpc cannot share a process with protos.inference.
_TRITON_CLIENT_SCRIPT = textwrap.dedent("""
    import json, queue, sys
    import numpy as np
    import tritonclient.grpc as grpcclient

    address = sys.argv[1]
    report = {}
    client = grpcclient.InferenceServerClient(url=address)
    report["live"] = client.is_server_live()
    report["ready"] = client.is_server_ready()
    report["model_ready"] = client.is_model_ready("add_sub")
    metadata = client.get_server_metadata(as_json=True)
    report["server"] = [metadata["name"], metadata.get("extensions", [])]
    model = client.get_model_metadata("add_sub", as_json=True)
    report["inputs"] = [[t["name"], t["datatype"], [int(d) for d in t["shape"]]] for t in model["inputs"]]
    config = client.get_model_config("mlp_onnx", as_json=True)["config"]
    report["mlp_config"] = [[t["name"], t["data_type"], [int(d) for d in t["dims"]]]
                            for t in config["input"] + config["output"]]

    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.ones((2, 16), dtype=np.float32)
    inputs = [grpcclient.InferInput("INPUT0", [2, 16], "FP32"), grpcclient.InferInput("INPUT1", [2, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("add_sub", inputs, outputs=[grpcclient.InferRequestedOutput("OUTPUT1")],
                          request_id="triton-1", client_timeout=30)
    report["infer"] = {
        "id": result.get_response().id,
        "outputs": [o.name for o in result.get_response().outputs],
        "output1_ok": bool(np.array_equal(result.as_numpy("OUTPUT1"), a - b)),
    }

    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    prompt = grpcclient.InferInput("PROMPT", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"The scheduler"], dtype=object))
    max_tokens = grpcclient.InferInput("MAX_TOKENS", [1], "INT32")
    max_tokens.set_data_from_numpy(np.array([5], dtype=np.int32))
    client.async_stream_infer("textgen", [prompt, max_tokens], request_id="stream-1",
                              enable_empty_final_response=True)
    tokens, errors, finals = [], [], []
    for _ in range(64):  # bounded: 5 tokens and one empty final response expected
        result, error = responses.get(timeout=30)
        if error is not None:
            errors.append(str(error))
            break
        final = result.get_response().parameters["triton_final_response"].bool_param
        finals.append(final)
        token = result.as_numpy("TOKEN")
        if token is not None:
            tokens.append(token[0].decode())
        if final:
            break
    client.stop_stream()
    report["stream"] = {"tokens": tokens, "errors": errors, "finals": finals}

    stats = client.get_inference_statistics("add_sub", as_json=True)["model_stats"][0]
    report["stats"] = {"name": stats["name"], "inference_count": int(stats.get("inference_count", 0)),
                       "success": int(stats["inference_stats"]["success"].get("count", 0))}
    client.close()
    print("REPORT " + json.dumps(report))
""")


def test_tritonclient_works_unchanged(examples_runtime):
    completed = subprocess.run(
        [sys.executable, "-c", _TRITON_CLIENT_SCRIPT, examples_runtime.address],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    line = next(line for line in completed.stdout.splitlines() if line.startswith("REPORT "))
    report = json.loads(line[len("REPORT "):])

    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["server"][0] == "meshserve"
    assert report["inputs"] == [["INPUT0", "FP32", [-1, 16]], ["INPUT1", "FP32", [-1, 16]]]
    assert report["mlp_config"] == [["INPUT", "TYPE_FP32", [8]], ["OUTPUT", "TYPE_FP32", [4]]]
    assert report["infer"] == {"id": "triton-1", "outputs": ["OUTPUT1"], "output1_ok": True}
    stream = report["stream"]
    assert stream["errors"] == []
    assert len(stream["tokens"]) == 5
    assert stream["finals"] == [False] * 5 + [True]
    assert stream["tokens"] == expected_tokens("The scheduler", 5)
    assert report["stats"]["name"] == "add_sub"
    assert report["stats"]["inference_count"] >= 2 and report["stats"]["success"] >= 1
