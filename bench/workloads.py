"""The workloads the benchmarks send, their answer checks, and the repositories they serve.

A repository built here holds exactly one model, copied from its source
folder; the unbatched variant differs from the batched one only by the
absence of ``dynamic_batching`` in its config (parsed and rewritten through
``ModelConfig``, so nothing else can change by accident).
"""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
from google.protobuf import text_format

from bench.loadgen import infer_request, output_arrays
from bench.servers import REPO_ROOT
from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import model_config_pb2 as mc

EXAMPLE_MODELS = REPO_ROOT / "examples" / "models"
BENCH_MODELS = REPO_ROOT / "bench" / "models"
_SEED = 20261122


def make_repository(model_dir: pathlib.Path, parent: pathlib.Path, *, batching: bool = True) -> pathlib.Path:
    """A one-model repository under ``parent``; ``batching=False`` drops dynamic_batching."""
    repository = parent / f"{model_dir.name}-{'batched' if batching else 'unbatched'}"
    target = repository / model_dir.name
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if not batching:
        config_path = target / "config.pbtxt"
        config = text_format.Parse(config_path.read_text(), mc.ModelConfig())
        config.ClearField("dynamic_batching")
        config_path.write_text(text_format.MessageToString(config))
    return repository


def has_dynamic_batching(repository: pathlib.Path, model: str) -> bool:
    config = text_format.Parse((repository / model / "config.pbtxt").read_text(), mc.ModelConfig())
    return config.HasField("dynamic_batching")


def add_sub_request() -> pb.ModelInferRequest:
    """One add_sub request: INPUT0, INPUT1 FP32 [1, 16] (a batch of one)."""
    rng = np.random.default_rng(_SEED)
    a, b = (rng.random((1, 16), dtype=np.float32) for _ in range(2))
    return infer_request("add_sub", {"INPUT0": a, "INPUT1": b}, ["OUTPUT0", "OUTPUT1"])


def check_add_sub(request: pb.ModelInferRequest, response: pb.ModelInferResponse) -> None:
    a, b = (np.frombuffer(raw, np.float32).reshape(1, 16) for raw in request.raw_input_contents)
    outputs = output_arrays(response)
    assert set(outputs) >= {"OUTPUT0", "OUTPUT1"}, f"outputs {sorted(outputs)}"
    assert np.allclose(outputs["OUTPUT0"].reshape(1, 16), a + b), "OUTPUT0 is not INPUT0 + INPUT1"
    assert np.allclose(outputs["OUTPUT1"].reshape(1, 16), a - b), "OUTPUT1 is not INPUT0 - INPUT1"


def echo_request(model: str, shape: tuple[int, ...]) -> pb.ModelInferRequest:
    """A request for an identity model: INPUT0 FP32 of ``shape``, asking for OUTPUT0."""
    array = np.random.default_rng(_SEED).random(shape, dtype=np.float32)
    return infer_request(model, {"INPUT0": array}, ["OUTPUT0"])


def check_echo(request: pb.ModelInferRequest, response: pb.ModelInferResponse) -> None:
    sent = request.inputs[0]
    expected = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(list(sent.shape))
    outputs = output_arrays(response)
    assert "OUTPUT0" in outputs, f"outputs {sorted(outputs)}"
    got = outputs["OUTPUT0"]
    assert list(got.shape) == list(sent.shape), f"shape {list(got.shape)}, sent {list(sent.shape)}"
    assert np.array_equal(got, expected), "OUTPUT0 differs from INPUT0"
