"""Model configurations the runtime cannot honour are refused, never half-served.

One runtime serves tests/models/bad_configs: one valid model ("good") among
models that are each refused for one reason. RepositoryIndex's reason names
the config file and the field; the good model serves regardless.
"""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
from conftest import RuntimeProcess
from test_runtime_helpers import (
    BAD_CONFIGS,
    REPO_ROOT,
    RPC_TIMEOUT_S,
    assert_status,
    decode_outputs,
    infer_request,
    open_stub,
    rpc_error,
)

from meshserve.protos.inference import grpc_service_pb2 as pb

# model folder -> fragments its RepositoryIndex reason must contain (besides the file).
REFUSED = {
    "sequence": ["field 'sequence_batching'", "not supported"],
    "optimized": ["field 'optimization'", "not supported"],
    "unknown_field": ["not_a_field", "not supported"],
    "no_config": ["missing", "python"],
    "misnamed": ["field 'name'", "'other_name'", "'misnamed'"],
    "generator": ["generator", "decoupled"],
    "unknown_backend": ["field 'backend'", "tensorrt"],
    "batching_without_batch_axis": ["dynamic_batching", "max_batch_size"],
}


@pytest.fixture(scope="module")
def stub():
    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(BAD_CONFIGS),
                              "--model-control", "explicit"])
    channel, stub = open_stub(process.address)
    yield stub
    channel.close()
    process.stop()


def _index(stub) -> dict[str, pb.RepositoryIndexResponse.ModelIndex]:
    response = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=RPC_TIMEOUT_S)
    return {model.name: model for model in response.models}


def _good_request(model: str = "good") -> pb.ModelInferRequest:
    return infer_request(model, {"X": np.array([41], np.int32)})


def test_the_valid_model_serves_among_refused_ones(stub):
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=RPC_TIMEOUT_S).ready
    assert _index(stub)["good"].state == "READY"
    response = stub.ModelInfer(_good_request(), timeout=RPC_TIMEOUT_S)
    assert decode_outputs(response)["Y"].tolist() == [42]


def test_every_model_on_disk_is_indexed(stub):
    assert set(_index(stub)) == {"good", *REFUSED}


@pytest.mark.parametrize("model", list(REFUSED))
def test_refused_model_reason_names_the_file_and_the_problem(stub, model):
    row = _index(stub)[model]
    assert row.state == "UNAVAILABLE"
    assert str(BAD_CONFIGS / model / "config.pbtxt") in row.reason
    for fragment in REFUSED[model]:
        assert fragment in row.reason, row.reason
    assert not stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=RPC_TIMEOUT_S).ready


@pytest.mark.parametrize("model", ["sequence", "misnamed", "no_config"])
def test_refused_model_answers_unavailable_with_its_reason(stub, model):
    error = rpc_error(stub.ModelInfer, _good_request(model))
    assert_status(error, grpc.StatusCode.UNAVAILABLE, model, *REFUSED[model][:1])
    error = rpc_error(stub.ModelConfig, pb.ModelConfigRequest(name=model))
    assert_status(error, grpc.StatusCode.UNAVAILABLE, model)


def test_explicit_load_of_a_refused_model_fails_with_the_reason(stub):
    error = rpc_error(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="sequence"))
    assert_status(error, grpc.StatusCode.UNAVAILABLE, "sequence", "field 'sequence_batching'",
                  str(BAD_CONFIGS / "sequence" / "config.pbtxt"))
    assert _index(stub)["sequence"].state == "UNAVAILABLE"
    assert stub.ModelInfer(_good_request(), timeout=RPC_TIMEOUT_S).outputs  # the good one still serves


def test_unknown_field_is_named_exactly(stub):
    assert "field 'not_a_field' is not supported" in _index(stub)["unknown_field"].reason


def test_strict_mode_exits_when_a_model_is_refused():
    completed = subprocess.run(
        [sys.executable, "-m", "meshserve.runtime", "--model-repository", str(BAD_CONFIGS),
         "--listen", "127.0.0.1:0", "--strict"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode != 0
    output = completed.stdout + completed.stderr
    assert "--strict" in output and "failed to load" in output
    assert "listening on" not in output


def test_strict_mode_exit_is_clean():
    completed = subprocess.run(
        [sys.executable, "-m", "meshserve.runtime", "--model-repository", str(BAD_CONFIGS),
         "--listen", "127.0.0.1:0", "--strict", "--log-level", "CRITICAL"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode != 0
    assert "Traceback" not in completed.stderr and "never awaited" not in completed.stderr, completed.stderr


def test_strict_mode_serves_when_every_selected_model_loads(start_runtime):
    runtime = start_runtime("--model-repository", BAD_CONFIGS, "--model", "good", "--strict")
    channel, stub = open_stub(runtime.address)
    with channel:
        assert decode_outputs(stub.ModelInfer(_good_request(), timeout=RPC_TIMEOUT_S))["Y"].tolist() == [42]
        assert set(_index(stub)) == {"good"}
