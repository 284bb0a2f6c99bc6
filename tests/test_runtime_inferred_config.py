"""A config completed from an ONNX graph with no config.pbtxt at all, and labelled classification."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from test_runtime_helpers import RPC_TIMEOUT_S, decode_outputs, infer_request, open_stub

from meshserve.protos.inference import grpc_service_pb2 as pb

REPOSITORY = pathlib.Path(__file__).parent / "models" / "inferred"


@pytest.fixture(scope="module")
def stub():
    from conftest import RuntimeProcess

    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(REPOSITORY)])
    channel, stub = open_stub(process.address)
    yield stub
    channel.close()
    process.stop()


def test_an_onnx_model_without_config_is_served_with_tensors_from_its_graph(stub):
    config = stub.ModelConfig(pb.ModelConfigRequest(name="mlp_without_config"), timeout=RPC_TIMEOUT_S).config
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 0
    assert [(t.name, list(t.dims)) for t in config.input] == [("INPUT", [-1, 8])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("OUTPUT", [-1, 4])]
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(3, 8)
    response = stub.ModelInfer(infer_request("mlp_without_config", {"INPUT": x}), timeout=RPC_TIMEOUT_S)
    assert decode_outputs(response)["OUTPUT"].shape == (3, 4)


def test_classification_names_labels_from_label_filename(stub):
    logits = np.array([[0.1, 3.0, 0.2, 2.0], [5.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    request = infer_request("scorer", {"LOGITS": logits})
    request.outputs.add(name="SCORES").parameters["classification"].int64_param = 2
    response = stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    top = decode_outputs(response)["SCORES"]
    assert top.shape == (2, 2)
    assert [[item.split(b":", 1)[1] for item in row] for row in top] == [
        [b"1:dog", b"3:fish"], [b"0:cat", b"1:dog"],
    ]
    assert float(top[0][0].split(b":")[0]) == pytest.approx(float(np.exp(3.0) / np.exp(logits[0]).sum()), rel=1e-5)
