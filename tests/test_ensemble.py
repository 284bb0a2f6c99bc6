"""Triton ensembles served by real runtime processes (tests/models/ensembles, port 0).

One runtime serves the whole test repository: step models, good ensembles and
the refused ``bad_*`` ones (each refused for one reason, named in the index).
The remote-step tests start two runtimes: one serving the step model, one
serving the ensemble with ``--remote-model``. Triton's own client runs in a
child process (it cannot share a process with ``protos.inference``).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO_ROOT, RuntimeProcess

from meshserve.clients import FailedPrecondition, InferenceClient, Internal, Unavailable

ENSEMBLES = pathlib.Path(__file__).resolve().parent / "models" / "ensembles"
# Bounds a hung server; not a performance claim.
RPC_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def runtime():
    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(ENSEMBLES)])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(runtime):
    with InferenceClient(runtime.address, timeout=RPC_TIMEOUT_S) as client:
        yield client


def _x(batch: int = 2) -> np.ndarray:
    return np.arange(batch * 4, dtype=np.float32).reshape(batch, 4) - 1.5


def _stats(client, model: str):
    return client.model_statistics(model).model_stats[0]


def test_triton_style_ensemble_answers_as_one_model(client):
    before = _stats(client, "double").inference_stats.success.count
    x = _x()
    out = client.infer("chain", {"INPUT": x}, request_id="c-1")
    np.testing.assert_array_equal(out["OUTPUT"], 2 * x + 1)

    metadata = client.model_metadata("chain")
    assert metadata.platform == "ensemble" and list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("INPUT", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("OUTPUT", "FP32", [-1, 4])]

    config = client.model_config("chain").config
    assert config.platform == "ensemble" and config.max_batch_size == 8
    assert [(s.model_name, s.model_version, dict(s.input_map), dict(s.output_map))
            for s in config.ensemble_scheduling.step] == [
        ("double", -1, {"IN": "INPUT"}, {"OUT": "doubled"}),
        ("add_one", -1, {"IN": "doubled"}, {"OUT": "OUTPUT"}),
    ]

    stats = _stats(client, "chain")
    assert stats.name == "chain" and stats.inference_stats.success.count >= 1
    assert stats.inference_count >= 2
    # Each step keeps its own statistics.
    assert _stats(client, "double").inference_stats.success.count >= before + 1
    assert _stats(client, "add_one").inference_stats.success.count >= 1
    assert client.is_model_ready("chain")


def test_dag_with_fan_out_and_join(client):
    x = _x(3)
    out = client.infer("diamond", {"INPUT": x})
    doubled = 2 * x
    np.testing.assert_allclose(out["SUM"], (doubled + 1) + doubled * doubled)
    np.testing.assert_allclose(out["DIFF"], (doubled + 1) - doubled * doubled)
    only = client.infer("diamond", {"INPUT": x}, outputs=["DIFF"])
    assert set(only) == {"DIFF"}


def test_independent_steps_run_at_the_same_time(client):
    # meet_left and meet_right wait for each other at a Barrier: run one after the other, both fail.
    x = _x(1)
    out = client.infer("parallel", {"INPUT": x})
    np.testing.assert_array_equal(out["LEFT"], x)
    np.testing.assert_array_equal(out["RIGHT"], x)


@pytest.mark.parametrize("model, fragments", [
    ("bad_cycle", ["has a cycle", "step 1 (model 'join') -> 'summed' -> step 2 (model 'double')",
                   "'looped'"]),
    ("bad_unproduced", ["step 2 (model 'join')", "input 'B'", "'nowhere'",
                        "neither an ensemble input nor any step's output"]),
    ("bad_dtype", ["step 2 (model 'int_identity')", "input 'IN'", "'doubled'", "INT32",
                   "step 1 (model 'double') output 'OUT' is FP32"]),
    ("bad_shape", ["output 'OUTPUT'", "shape [-1, 3]", "step 1 (model 'add_one') output 'OUT'", "[-1, 4]"]),
    ("bad_unknown_model", ["step 2 (model 'no_such_model')", "not in the repository"]),
    ("bad_broken_step", ["step 1 (model 'broken')", "not ready", "broken cannot load"]),
    ("bad_output_unproduced", ["output 'EXTRA'", "produced by no step"]),
    ("bad_step_tensor", ["step 1 (model 'double')", "input_map key 'X'", "not an input"]),
])
def test_refused_ensemble_is_unavailable_with_its_reason(client, model, fragments):
    rows = {m.name: m for m in client.repository_index().models}
    assert rows[model].state == "UNAVAILABLE"
    reason = rows[model].reason
    assert f"ensemble '{model}'" in reason
    for fragment in fragments:
        assert fragment in reason, reason
    with pytest.raises(Unavailable, match="is not ready"):
        client.infer(model, {"INPUT": _x(1)})
    assert rows["double"].state == "READY"  # its steps, and every other model, still serve


def test_unused_step_output_warns_and_still_loads(client, runtime):
    rows = {m.name: m for m in client.repository_index().models}
    assert rows["warn_unused"].state == "READY"
    assert "WARNING" in rows["warn_unused"].reason
    assert "step 1 (model 'join'): output 'DIFF' (ensemble tensor 'unused_diff') is never used" \
        in rows["warn_unused"].reason
    assert any("WARNING" in line and "unused_diff" in line for line in runtime.output)
    x = _x(1)
    np.testing.assert_array_equal(client.infer("warn_unused", {"INPUT": x})["OUTPUT"], 2 * x)


def test_failing_step_fails_only_its_request(client):
    with pytest.raises(Internal) as failure:
        client.infer("failing", {"INPUT": np.full((1, 4), -1, np.float32)})
    message = failure.value.message
    assert message.startswith("ensemble 'failing' step 2 (model 'fragile_step') failed: "), message
    assert "fragile_step refuses negative input -2.0" in message
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(client.infer("failing", {"INPUT": x})["OUTPUT"], 2 * x)
    assert _stats(client, "failing").inference_stats.fail.count >= 1
    assert _stats(client, "fragile_step").inference_stats.fail.count >= 1


def test_streaming_last_step_streams_through(client):
    x = np.ones((2, 4), np.float32)
    responses = list(client.stream("streaming", {"INPUT": x, "COUNT": np.array([3], np.int32)}))
    assert len(responses) == 3
    for index, outputs in enumerate(responses):
        np.testing.assert_array_equal(outputs["OUTPUT"], 2 * x * (index + 1))
    assert client.model_config("streaming").config.model_transaction_policy.decoupled
    with pytest.raises(FailedPrecondition, match="ModelStreamInfer"):
        client.infer("streaming", {"INPUT": x, "COUNT": np.array([3], np.int32)})


def test_non_decoupled_ensemble_answers_a_stream_once(client):
    x = _x(1)
    responses = list(client.stream("chain", {"INPUT": x}))
    assert len(responses) == 1
    np.testing.assert_array_equal(responses[0]["OUTPUT"], 2 * x + 1)


# -- remote steps --------------------------------------------------------------


@pytest.fixture(scope="module")
def split(runtime):
    """A step replica (add_one, fragile_step) and an ensemble replica calling it over gRPC."""
    steps = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(ENSEMBLES),
                            "--model", "add_one", "--model", "fragile_step"])
    front = None
    try:
        front = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(ENSEMBLES),
                                "--model", "chain", "--model", "failing",
                                "--remote-model", f"add_one={steps.address}",
                                "--remote-model", f"fragile_step={steps.address}"])
        yield steps, front
    finally:
        if front is not None:
            front.stop()
        steps.stop()


def test_remote_step_runs_on_the_other_replica(split):
    steps, front = split
    with InferenceClient(front.address, timeout=RPC_TIMEOUT_S) as client, \
            InferenceClient(steps.address, timeout=RPC_TIMEOUT_S) as step_client:
        names = {m.name: m.state for m in client.repository_index().models}
        assert names == {"chain": "READY", "double": "READY", "failing": "READY"}  # never add_one here
        x = _x(2)
        np.testing.assert_array_equal(client.infer("chain", {"INPUT": x})["OUTPUT"], 2 * x + 1)
        assert _stats(step_client, "add_one").inference_stats.success.count == 1
        assert _stats(client, "double").inference_stats.success.count >= 1

        with pytest.raises(Internal) as failure:
            client.infer("failing", {"INPUT": np.full((1, 4), -3, np.float32)})
        message = failure.value.message
        assert message.startswith(
            f"ensemble 'failing' step 2 (model 'fragile_step') at {steps.address} failed: "), message
        assert "fragile_step refuses negative input -6.0" in message
        x = np.ones((1, 4), np.float32)
        np.testing.assert_array_equal(client.infer("failing", {"INPUT": x})["OUTPUT"], 2 * x)


def test_remote_step_unreachable_refuses_the_ensemble(start_runtime):
    # Port 1 on loopback: nothing listens, so the step's config cannot be read at load.
    front = start_runtime("--model-repository", ENSEMBLES, "--model", "chain",
                          "--remote-model", "add_one=127.0.0.1:1")
    with InferenceClient(front.address, timeout=RPC_TIMEOUT_S) as client:
        rows = {m.name: m for m in client.repository_index().models}
        assert rows["chain"].state == "UNAVAILABLE"
        assert "step 2 (model 'add_one'): cannot read its config from the remote replica at 127.0.0.1:1" \
            in rows["chain"].reason


def test_remote_model_flag_is_checked(start_runtime):
    with pytest.raises(RuntimeError, match="expected NAME=HOST:PORT"):
        start_runtime("--model-repository", ENSEMBLES, "--remote-model", "add_one")


# -- Triton's own client -------------------------------------------------------

_TRITON_CLIENT_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=sys.argv[1])
    report = {"ready": client.is_model_ready("diamond")}
    metadata = client.get_model_metadata("diamond", as_json=True)
    report["platform"] = metadata["platform"]
    config = client.get_model_config("diamond", as_json=True)["config"]
    report["steps"] = [step["model_name"] for step in config["ensemble_scheduling"]["step"]]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    tensor = grpcclient.InferInput("INPUT", [2, 4], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("diamond", [tensor], request_id="triton-ensemble", client_timeout=30)
    d = 2 * x
    report["sum_ok"] = bool(np.allclose(result.as_numpy("SUM"), (d + 1) + d * d))
    report["id"] = result.get_response().id
    stats = client.get_inference_statistics("diamond", as_json=True)["model_stats"][0]
    report["success"] = int(stats["inference_stats"]["success"].get("count", 0))
    client.close()
    print("REPORT " + json.dumps(report))
""")


def test_tritonclient_calls_an_ensemble(runtime):
    completed = subprocess.run([sys.executable, "-c", _TRITON_CLIENT_SCRIPT, runtime.address],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    line = next(line for line in completed.stdout.splitlines() if line.startswith("REPORT "))
    report = json.loads(line[len("REPORT "):])
    assert report["ready"] and report["platform"] == "ensemble"
    assert report["steps"] == ["join", "double", "add_one", "square"]
    assert report["sum_ok"] and report["id"] == "triton-ensemble"
    assert report["success"] >= 1
