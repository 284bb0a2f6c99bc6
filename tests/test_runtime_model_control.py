"""Model control and model names on a runtime (runtime/model_control.py, runtime/model_names.py).

Attacks from issue 9: against a runtime started with ``--model add_sub``,
any client loaded ``textgen`` and unloaded ``add_sub`` while health stayed
SERVING; and model names are folder names, so ``../x`` must never be one.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import EXAMPLES, REPO_ROOT, RuntimeProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_runtime_helpers import RPC_TIMEOUT_S, assert_status, check_add_sub, infer_request, open_stub, rpc_error

from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.runtime.server import SERVICE_NAME

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _ready(stub, name: str) -> bool:
    return stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=RPC_TIMEOUT_S).ready


def _health(channel: grpc.Channel, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=RPC_TIMEOUT_S).status


def _load(stub, name: str, timeout: float = RPC_TIMEOUT_S):
    return stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=timeout)


def _unload(stub, name: str, timeout: float = RPC_TIMEOUT_S):
    return stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=timeout)


def test_load_and_unload_are_refused_by_default_naming_the_flag(start_runtime):
    runtime = start_runtime("--model-repository", EXAMPLES, "--model", "add_sub")
    channel, stub = open_stub(runtime.address)
    with channel:
        error = rpc_error(_load, stub, "textgen")
        assert_status(error, grpc.StatusCode.FAILED_PRECONDITION, "--model-control explicit")
        error = rpc_error(_unload, stub, "add_sub")
        assert_status(error, grpc.StatusCode.FAILED_PRECONDITION, "--model-control explicit")
        assert not _ready(stub, "textgen")
        assert _ready(stub, "add_sub")
        check_add_sub(stub)
    assert "Traceback" not in "".join(runtime.output)


def test_explicit_model_control_is_limited_to_the_models_started_with(start_runtime):
    runtime = start_runtime("--model-repository", EXAMPLES, "--model", "add_sub", "--model-control", "explicit")
    channel, stub = open_stub(runtime.address)
    with channel:
        error = rpc_error(_load, stub, "textgen")
        assert_status(error, grpc.StatusCode.FAILED_PRECONDITION, "textgen", "--model add_sub")
        assert not _ready(stub, "textgen")
        _load(stub, "add_sub")  # a reload of its own model is allowed
        check_add_sub(stub)


def test_health_is_not_serving_once_the_last_model_is_unloaded_and_serving_again_on_load(start_runtime):
    runtime = start_runtime("--model-repository", EXAMPLES, "--model", "add_sub", "--model-control", "explicit")
    channel, stub = open_stub(runtime.address)
    with channel:
        assert (_health(channel, ""), _health(channel, SERVICE_NAME)) == (SERVING, SERVING)
        _unload(stub, "add_sub")
        assert (_health(channel, ""), _health(channel, SERVICE_NAME)) == (NOT_SERVING, NOT_SERVING)
        _load(stub, "add_sub")
        assert (_health(channel, ""), _health(channel, SERVICE_NAME)) == (SERVING, SERVING)
        check_add_sub(stub)


# -- model names ---------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime():
    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(EXAMPLES), "--model", "add_sub",
                              "--model-control", "explicit"])
    yield process
    process.stop()


def _stream_error(stub, name: str) -> str:
    request = infer_request(name, {"INPUT0": np.zeros((1, 16), np.float32)})
    responses = list(stub.ModelStreamInfer(iter([request]), timeout=RPC_TIMEOUT_S))
    assert len(responses) == 1
    return responses[0].error_message


RPCS = {
    "ModelReady": lambda stub, name, timeout: stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=timeout),
    "ModelMetadata": lambda stub, name, timeout: stub.ModelMetadata(pb.ModelMetadataRequest(name=name),
                                                                    timeout=timeout),
    "ModelConfig": lambda stub, name, timeout: stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=timeout),
    "ModelStatistics": lambda stub, name, timeout: stub.ModelStatistics(pb.ModelStatisticsRequest(name=name),
                                                                        timeout=timeout),
    "ModelInfer": lambda stub, name, timeout: stub.ModelInfer(
        infer_request(name, {"INPUT0": np.zeros((1, 16), np.float32)}), timeout=timeout),
    "RepositoryModelLoad": _load,
    "RepositoryModelUnload": _unload,
}


@pytest.mark.parametrize("rpc", sorted(RPCS))
@pytest.mark.parametrize("name", ["../x", "../add_sub", "add_sub/../add_sub", "/etc", "a\\b", "x\0y", "..",
                                  "n" * 256])
def test_every_rpc_refuses_a_model_name_that_is_not_a_plain_name(runtime, rpc, name):
    channel, stub = open_stub(runtime.address)
    with channel:
        error = rpc_error(RPCS[rpc], stub, name)
        assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "model name")
        check_add_sub(stub)


@pytest.mark.parametrize("name", ["../x", "a/b", "x\0y"])
def test_a_stream_request_with_a_path_as_model_name_is_refused(runtime, name):
    channel, stub = open_stub(runtime.address)
    with channel:
        assert _stream_error(stub, name).startswith("INVALID_ARGUMENT: invalid model name")
    assert "Traceback" not in "".join(runtime.output)


# -- Triton's own client: unload_model always sends unload_dependents ----------

ENSEMBLES = REPO_ROOT / "tests" / "models" / "ensembles"
STEPS_OF = {"chain": {"double", "add_one"}, "diamond": {"join", "double", "add_one", "square"}}


def test_tritonclient_unloads_with_and_without_its_dependents(start_runtime):
    """tritonclient's ``unload_model`` sets ``unload_dependents`` on every call; before it was accepted every
    unload from Triton's client failed INVALID_ARGUMENT. True also unloads the ensemble's local steps that no
    other loaded ensemble uses (Triton's meaning); loading the ensemble brings them back."""
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    runtime = start_runtime("--model-repository", ENSEMBLES, "--model", "chain", "--model", "diamond",
                            "--model-control", "explicit")
    every = {"chain", "diamond"} | STEPS_OF["diamond"]
    client = triton.InferenceServerClient(runtime.address)
    try:
        def ready() -> set[str]:
            return {name for name in every if client.is_model_ready(name)}

        assert ready() == every
        client.unload_model("chain")
        assert ready() == every - {"chain"}
        client.load_model("chain")
        assert ready() == every
        client.unload_model("chain", unload_dependents=True)   # diamond still uses double and add_one
        assert ready() == every - {"chain"}
        client.unload_model("diamond", unload_dependents=True)
        assert ready() == set()
        client.load_model("diamond")
        assert ready() == {"diamond"} | STEPS_OF["diamond"]
        with pytest.raises(InferenceServerException, match="not loaded"):
            client.unload_model("chain", unload_dependents=True)
    finally:
        client.close()
    assert "Traceback" not in "".join(runtime.output)


@pytest.mark.parametrize(("parameter", "fragment"), [
    ("string_param", "'unload_dependents' must be a bool"),
    ("other", "repository parameters (other) are not supported"),
])
def test_an_unload_parameter_other_than_a_bool_unload_dependents_is_refused(runtime, parameter, fragment):
    request = pb.RepositoryModelUnloadRequest(model_name="add_sub")
    if parameter == "other":
        request.parameters["other"].bool_param = True
    else:
        request.parameters["unload_dependents"].string_param = "yes"
    channel, stub = open_stub(runtime.address)
    with channel:
        error = rpc_error(stub.RepositoryModelUnload, request)
        assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, fragment)
        check_add_sub(stub)
