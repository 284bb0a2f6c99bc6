"""Triton's ``model_warmup``: samples run before a model is ready, checked before anything runs.

Real runtime processes on loopback. The model writes one line per call it answers into a file named by
its parameters, so the test reads exactly which warm-up calls ran, and in which order, before the health
service first said SERVING.
"""

from __future__ import annotations

import pathlib
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.clients import InferenceClient
from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc

RECORDER = '''
import pathlib, numpy as np

class Predictor:
    def __init__(self, config):
        self.log = pathlib.Path(config["parameters"]["log"])

    def predict(self, inputs):
        x = inputs["X"]
        with self.log.open("a") as f:
            f.write(f"{x.shape} {float(x.sum())}\\n")
        if float(x.sum()) == -1.0:
            raise ValueError("minus one is refused")
        return {"Y": x * 2}
'''


def repository(tmp_path: pathlib.Path, warmup: str, max_batch_size: int = 4) -> tuple[pathlib.Path, pathlib.Path]:
    log = tmp_path / "calls.log"
    model = tmp_path / "models" / "rec"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(RECORDER)
    dims = "[ 2 ]"
    (model / "config.pbtxt").write_text(f'''name: "rec"
backend: "python"
max_batch_size: {max_batch_size}
input [ {{ name: "X" data_type: TYPE_FP32 dims: {dims} }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: {dims} }} ]
parameters [ {{ key: "log" value: {{ string_value: "{log}" }} }} ]
{warmup}
''')
    return tmp_path / "models", log


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def wait_serving(address: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while health(address) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "the runtime never became SERVING"
        time.sleep(0.05)


def test_samples_run_before_the_model_is_ready(tmp_path, start_runtime):
    models, log = repository(tmp_path, '''
model_warmup [
  { name: "zeros" batch_size: 2 count: 3 inputs { key: "X" value: { data_type: TYPE_FP32 dims: [ 2 ] zero_data: true } } },
  { name: "from-file" batch_size: 1 inputs { key: "X" value: { data_type: TYPE_FP32 dims: [ 2 ] input_data_file: "x.raw" } } }
]''')
    (models / "rec" / "warmup").mkdir()
    (models / "rec" / "warmup" / "x.raw").write_bytes(np.array([1.5, 2.5], dtype=np.float32).tobytes())
    runtime = start_runtime("--model-repository", models)
    wait_serving(runtime.address)
    warmed = log.read_text().splitlines()
    assert warmed == ["(2, 2) 0.0"] * 3 + ["(1, 2) 4.0"]       # every sample, count times, in order
    with InferenceClient(runtime.address) as client:
        out = client.infer("rec", {"X": np.array([[1, 2]], dtype=np.float32)})
    assert out["Y"].tolist() == [[2, 4]]
    assert log.read_text().splitlines()[len(warmed):] == ["(1, 2) 3.0"]


def model_state(address: str) -> tuple[bool, str]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
        ready = stub.ModelReady(pb.ModelReadyRequest(name="rec"), timeout=5).ready
    reasons = [m.reason for m in index.models if m.name == "rec"]
    return ready, " ".join(reasons)


def test_a_failing_sample_fails_the_load_naming_the_sample(tmp_path, start_runtime):
    models, log = repository(tmp_path, '''
model_warmup [ { name: "bad" batch_size: 1 inputs { key: "X" value: { data_type: TYPE_FP32 dims: [ 2 ] input_data_file: "minus.raw" } } } ]''')
    (models / "rec" / "warmup").mkdir()
    (models / "rec" / "warmup" / "minus.raw").write_bytes(np.array([-0.5, -0.5], dtype=np.float32).tobytes())
    runtime = start_runtime("--model-repository", models)
    deadline = time.monotonic() + 60
    while "warm-up" not in "".join(runtime.output) and time.monotonic() < deadline:
        time.sleep(0.1)
    ready, reason = model_state(runtime.address)
    assert not ready
    assert "warm-up sample 'bad' failed" in reason and "minus one is refused" in reason, reason
    assert health(runtime.address) != health_pb2.HealthCheckResponse.SERVING


def test_hostile_warmup_configs_are_refused_with_file_and_field(tmp_path, start_runtime):
    cases = {
        "escape": ('input_data_file: "../../etc/passwd"', "must be a plain file name"),
        "missing": ('input_data_file: "absent.raw"', "is not a regular file"),
        "size": ('input_data_file: "short.raw"', "raw data is 3 bytes"),
        "free-dims": None,
    }
    for name, case in cases.items():
        base = tmp_path / name
        if case is None:
            warmup = ('model_warmup [ { name: "w" batch_size: 1 inputs { key: "X" value: '
                      '{ data_type: TYPE_FP32 dims: [ -1 ] zero_data: true } } } ]')
            expected = "must be fixed"
        else:
            data, expected = case
            warmup = ('model_warmup [ { name: "w" batch_size: 1 inputs { key: "X" value: '
                      f'{{ data_type: TYPE_FP32 dims: [ 2 ] {data} }} }} }} ]')
        models, log = repository(base, warmup)
        (models / "rec" / "warmup").mkdir()
        (models / "rec" / "warmup" / "short.raw").write_bytes(b"abc")
        runtime = start_runtime("--model-repository", models)
        deadline = time.monotonic() + 60
        while "model_warmup" not in "".join(runtime.output) and time.monotonic() < deadline:
            time.sleep(0.1)
        ready, reason = model_state(runtime.address)
        assert not ready, name
        assert "config.pbtxt: model_warmup 'w'" in reason and expected in reason, (name, reason)
        assert not log.exists(), f"{name}: nothing may run before the samples are checked"
        runtime.stop()
