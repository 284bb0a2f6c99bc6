"""Triton Python-backend models (``TritonPythonModel``) served unchanged, called with tritonclient.

A real runtime serves a repository written by ``triton_python_models.py``
(Triton's add_sub, decoupled repeat and string models, plus probes); a real
proxy routes to it; tritonclient runs in its own process
(``triton_python_client.py``) against the runtime and the proxy alike.

With ``MESHSERVE_TRITON_PYTHON_BACKEND`` set to a checkout of Triton's
python_backend repository, ``test_published_examples_run_unchanged`` serves
its examples/add_sub and examples/decoupled files byte for byte.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import pytest
from conftest import RuntimeProcess
from test_proxy_helpers import ProxyRig, route
from test_runtime_helpers import RPC_TIMEOUT_S, open_stub
from triton_python_models import MODELS, write_repository

from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.runtime.backends import triton_python
from meshserve.runtime.backends import triton_python_backend_utils as pb_utils

HERE = pathlib.Path(__file__).resolve().parent
CLIENT = HERE / "triton_python_client.py"
CLIENT_TIMEOUT_S = 180  # bounds a hung client process; not a performance claim
PUBLISHED = os.environ.get("MESHSERVE_TRITON_PYTHON_BACKEND")


def call(address: str, *parts: str) -> dict:
    done = subprocess.run([sys.executable, str(CLIENT), address, *parts], capture_output=True, text=True,
                          timeout=CLIENT_TIMEOUT_S, cwd=HERE)
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


def serve(repository: pathlib.Path) -> RuntimeProcess:
    return RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(repository)])


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    process = serve(write_repository(tmp_path_factory.mktemp("triton_models")))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def proxy(loop, runtime):
    rig = ProxyRig(loop, *[route(name, ("r0", runtime.address)) for name in MODELS])
    yield rig
    rig.close()


def check_add_sub(report: dict) -> None:
    assert report["sum"] == [1.5, 2.25, 5.0, 12.0] and report["diff"] == [0.5, 1.75, 1.0, -4.0]
    assert report["dtype"] == "float32" and report["id"] == "as-1" and report["backend"] == "python"


def check_repeat(report: dict) -> None:
    assert report["stream"] == [
        {"id": "rep-1", "final": False, "IDX": [0], "OUT": [4]},
        {"id": "rep-1", "final": False, "IDX": [1], "OUT": [2]},
        {"id": "rep-1", "final": False, "IDX": [2], "OUT": [0]},
        {"id": "rep-1", "final": False, "IDX": [3], "OUT": [1]},
        {"id": "rep-1", "final": True},  # enable_empty_final_response: FINAL alone
    ]
    interleaved = report["interleaved"]
    slow = [r for r in interleaved if r["id"] == "slow"]
    assert slow == [{"id": "slow", "final": False, "IDX": [0], "OUT": [1]},
                    {"id": "slow", "final": False, "IDX": [1], "OUT": [2]},
                    {"id": "slow", "final": True, "IDX": [2], "OUT": [3]}]
    assert {"id": "fast", "final": True, "IDX": [0], "OUT": [9]} in interleaved
    # The instance took the fast request once the slow one's execute returned, not after its last response.
    assert interleaved.index({"id": "fast", "final": True, "IDX": [0], "OUT": [9]}) < len(interleaved) - 1
    status, message = report["unary"]
    assert status == "StatusCode.FAILED_PRECONDITION" and "decoupled" in message and "ModelStreamInfer" in message


@pytest.mark.parametrize("through", ["runtime", "proxy"])
def test_add_sub_and_decoupled_repeat_run_unchanged(through, runtime, proxy):
    address = runtime.address if through == "runtime" else proxy.address
    report = call(address, "add_sub", "repeat", "auto")
    check_add_sub(report["add_sub"])
    check_repeat(report["repeat"])
    assert report["auto"] == {"b": [3.0, 6.0, 9.0], "inputs": ["A"]}  # declared by auto_complete_config


def test_bytes_model_answers_np_bytes_and_object_then_fails_like_triton(tmp_path, loop):
    """Triton's string model: the first answer is np.bytes_, the second np.object_; the third
    indexes past its two dtypes, and that exception reaches the client as INTERNAL."""
    process = serve(write_repository(tmp_path, {"string": MODELS["string"]}))
    rig = ProxyRig(loop, route("string", ("r0", process.address)))
    try:
        assert call(rig.address, "string") == {"string": {"answers": [["hello"], ["meshserve"]]}}
        third = call(process.address, "string_third")["string_third"]["third"]
    finally:
        rig.close()
        process.stop()
    assert third == ["StatusCode.INTERNAL", "model 'string' failed: IndexError: list index out of range"]


def test_requests_are_batched_and_see_what_triton_gives_them(runtime):
    results = call(runtime.address, "probe")["probe"]["results"]
    assert sorted(results) == ["0", "1", "2", "3", "4", "5"]
    assert results.pop("5") == {"error": "[StatusCode.INVALID_ARGUMENT] asked to fail"}  # its own error only
    assert not [r for r in results.values() if "error" in r], results
    counts = []
    for key, result in results.items():
        i, seen = int(key), result["seen"]
        counts.append(seen["request_count"])
        assert seen["request_id"] == f"probe-{i}"
        assert seen["parameters"] == {"color": "red", "n": i}
        assert seen["requested"] == (["SEEN", "Y"] if i else ["SEEN"])
        assert seen["input_names"] == ["X"] and seen["is_cpu"] and seen["dlpack_roundtrip"]
        assert seen["type_number"] == 8 and seen["missing_input"]  # TYPE_INT32; an absent input is None
        if i:
            assert result["y"] == [[10 * i, 10 * (i + 1)]]
    assert max(counts) >= 2, f"the five requests sent during the first execute never shared one: {counts}"
    args = results["0"]["seen"]["args"]
    assert set(args) == {"model_config", "model_instance_kind", "model_instance_name", "model_instance_device_id",
                         "model_repository", "model_version", "model_name"}
    assert all(isinstance(value, str) for value in args.values())
    assert (args["model_name"], args["model_version"], args["model_instance_kind"]) == ("probe", "1", "CPU")
    assert args["model_instance_name"] == "probe_0" and args["model_instance_device_id"] == "0"
    assert pathlib.Path(args["model_repository"]).name == "probe"
    config = json.loads(args["model_config"])
    assert config["name"] == "probe" and config["backend"] == "python" and config["max_batch_size"] == 8
    assert config["input"][0]["dims"] == [2] and config["input"][0]["data_type"] == "TYPE_INT32"
    assert config["output"][0]["data_type"] == "TYPE_STRING"
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 100000
    assert config["parameters"] == {"greeting": {"string_value": "hello"}}


def test_failing_models_answer_the_right_status(runtime):
    report = call(runtime.address, "hostile")["hostile"]
    unary = report["unary"]
    assert unary["1"] == {"error": ["StatusCode.INTERNAL", "model 'hostile': the model refuses this batch"]}
    assert unary["2"]["error"][0] == "StatusCode.INTERNAL"
    assert "model 'hostile' returned 0 responses from execute for 1 requests" in unary["2"]["error"][1]
    assert unary["3"] == {"error": ["StatusCode.INVALID_ARGUMENT", "MODE 3 is not allowed"]}
    assert unary["4"] == {"error": ["StatusCode.INTERNAL", "model 'hostile' failed: ValueError: plain python failure"]}
    assert unary["5"]["error"][0] == "StatusCode.INTERNAL" and "returned NoneType" in unary["5"]["error"][1]
    assert unary["6"] == {"error": ["StatusCode.INTERNAL", "model 'hostile' returned no output 'OUT'"]}
    assert unary["7"] == {"error": ["StatusCode.INTERNAL", "model 'hostile' returned str, not an InferenceResponse"]}
    assert unary["10"] == {"error": ["StatusCode.INTERNAL", "model 'hostile': get_response_sender() needs "
                                     "model_transaction_policy { decoupled: true }; without it, return the "
                                     "responses from execute"]}
    assert unary["8"] == {"out": [16]} and unary["9"] == {"out": [18]}  # and it keeps serving
    stream = report["stream"]  # the requests of one stream run concurrently: any order across them
    dropped = ("INTERNAL: model 'hostile_stream' dropped the response sender of request 'mode-1' without sending "
               "TRITONSERVER_RESPONSE_COMPLETE_FINAL")
    assert stream.index({"id": "mode-1", "final": False, "OUT": [7]}) < stream.index({"error": dropped})
    errors = [r["error"] for r in stream if "error" in r]
    assert sorted(errors) == sorted([
        dropped,
        "INTERNAL: model 'hostile_stream': decoupled failure",
        "NOT_FOUND: not found here",
    ])
    # A send after FINAL raises in the model; the request was already answered.
    assert {"id": "mode-4", "final": True, "OUT": [7]} in stream
    assert {"id": "mode-9", "final": True, "OUT": [7]} in stream


def test_finalize_runs_when_the_runtime_drains(tmp_path):
    repository = write_repository(tmp_path, {"probe": MODELS["probe"]})
    process = serve(repository)
    assert not (repository / "probe" / "finalized").exists()
    assert process.stop() == 0
    assert (repository / "probe" / "finalized").read_text() == "probe_0"


def test_finalize_runs_when_the_model_is_unloaded(tmp_path):
    repository = write_repository(tmp_path, {"probe": MODELS["probe"]})
    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(repository),
                              "--model-control", "explicit"])
    try:
        assert not (repository / "probe" / "finalized").exists()
        # meshserve's stub: tritonclient's unload_model always sends unload_dependents, which is refused
        channel, stub = open_stub(process.address)
        with channel:
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="probe"), timeout=RPC_TIMEOUT_S)
            assert not stub.ModelReady(pb.ModelReadyRequest(name="probe"), timeout=RPC_TIMEOUT_S).ready
        assert (repository / "probe" / "finalized").read_text() == "probe_0"
    finally:
        process.stop()


def test_a_model_refusing_to_initialize_is_not_served(tmp_path):
    """repeat_int32 without the decoupled policy raises TritonModelException in initialize, as published."""
    config, source = MODELS["repeat_int32"]
    repository = write_repository(tmp_path, {"repeat_int32": (config.replace("decoupled: True", "decoupled: False"),
                                                             source)})
    process = serve(repository)
    try:
        state, reason = call(process.address, "index")["index"]["repeat_int32"]
    finally:
        process.stop()
    assert state == "UNAVAILABLE"
    assert "model 'repeat_int32' refused to initialize" in reason and "enable decoupled" in reason


def test_a_different_triton_utils_module_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, triton_python.MODULE_NAME, types.ModuleType(triton_python.MODULE_NAME))
    with pytest.raises(ImportError, match="a different 'triton_python_backend_utils'"):
        triton_python.bind_backend_utils()
    monkeypatch.delitem(sys.modules, triton_python.MODULE_NAME)
    triton_python.bind_backend_utils()
    assert sys.modules[triton_python.MODULE_NAME] is pb_utils


def test_response_sender_refuses_after_final_and_without_a_response():
    delivered = []
    sender = pb_utils.InferenceResponseSender(lambda response, final: delivered.append(final), lambda: False)
    with pytest.raises(pb_utils.TritonModelException, match="needs flags"):
        sender.send()
    with pytest.raises(pb_utils.TritonModelException, match="InferenceResponse"):
        sender.send("text")  # type: ignore[arg-type]
    sender.send(pb_utils.InferenceResponse([]), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    with pytest.raises(pb_utils.TritonModelException, match="has been closed"):
        sender.send(pb_utils.InferenceResponse([]))
    assert delivered == [True]


def test_type_tables_match_triton():
    import numpy as np

    assert pb_utils.triton_string_to_numpy("TYPE_FP32") is np.float32
    assert pb_utils.triton_string_to_numpy("TYPE_STRING") is np.object_
    assert [pb_utils.numpy_to_triton_type(t) for t in (np.bool_, np.int32, np.float64, np.object_, np.bytes_)] == \
        [1, 8, 12, 13, 13]
    assert pb_utils.triton_to_numpy_type(10) is np.float16 and pb_utils.triton_to_numpy_type(99) is None
    encoded = pb_utils.serialize_byte_tensor(np.array([b"ab", b"", "c"], dtype=np.object_))
    assert encoded.dtype == np.uint8 and bytes(encoded) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00\x01\x00\x00\x00c"
    assert pb_utils.deserialize_bytes_tensor(encoded).tolist() == [b"ab", b"", b"c"]


@pytest.mark.skipif(not PUBLISHED, reason="set MESHSERVE_TRITON_PYTHON_BACKEND to a python_backend checkout")
def test_published_examples_run_unchanged(tmp_path, loop):
    examples = pathlib.Path(PUBLISHED) / "examples"
    for name, folder, model, config in (("add_sub", "add_sub", "model.py", "config.pbtxt"),
                                        ("repeat_int32", "decoupled", "repeat_model.py", "repeat_config.pbtxt")):
        (tmp_path / name / "1").mkdir(parents=True)
        shutil.copyfile(examples / folder / model, tmp_path / name / "1" / "model.py")
        shutil.copyfile(examples / folder / config, tmp_path / name / "config.pbtxt")
    process = serve(tmp_path)
    rig = ProxyRig(loop, route("add_sub", ("r0", process.address)), route("repeat_int32", ("r0", process.address)))
    try:
        report = call(rig.address, "add_sub", "repeat")
    finally:
        rig.close()
        process.stop()
    check_add_sub(report["add_sub"])
    check_repeat(report["repeat"])


# -- the decoupled stream's bounds, in process (a real instance on a real executor) -----------------

class _Flood:
    """A decoupled model whose execute sends ``count`` responses, counting the sends that returned."""

    def __init__(self, count: int):
        import threading

        self.count = count
        self.sent = 0
        self.finished = threading.Event()
        self.errors: list[BaseException] = []

    def execute(self, requests):
        import numpy as np

        sender = requests[0].get_response_sender()
        try:
            for i in range(self.count):
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([i], np.int32))]))
                self.sent += 1
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except BaseException as err:  # a send after the client left must not raise into the model
            self.errors.append(err)
        finally:
            self.finished.set()


def _flood_instance(model, tmp_path):
    import concurrent.futures

    from meshserve.protos.inference import model_config_pb2 as mc
    from meshserve.runtime.backends import LoadContext

    config = mc.ModelConfig(name="flood", backend="python")
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    context = LoadContext(config, "1", tmp_path, executor, "cpu")
    return triton_python.TritonPythonInstance(context, model), executor


def _request():
    import numpy as np

    from meshserve.runtime.request import InferRequest

    return InferRequest(id="f", inputs={"MODE": np.array([1], np.int32)}, batch_size=1,
                        requested_outputs=None, parameters={})


def test_a_slow_reader_holds_the_model_and_a_departed_one_frees_it(tmp_path):
    import asyncio
    import time

    model = _Flood(count=10 * triton_python.RESPONSES_AHEAD)
    instance, executor = _flood_instance(model, tmp_path)
    released = []

    async def scenario():
        stream = instance.stream_request(_request(), lambda: released.append(True))
        first = await anext(stream)
        assert first["OUT"].tolist() == [0]
        # The reader stops: the model's sends stop once RESPONSES_AHEAD wait (bounded poll, not a sleep-assert).
        deadline = time.monotonic() + 20
        previous = -1
        while model.sent != previous and time.monotonic() < deadline:
            previous = model.sent
            await asyncio.sleep(0.3)
        assert model.sent <= triton_python.RESPONSES_AHEAD + 1, model.sent
        assert not model.finished.is_set() and not released
        await stream.aclose()  # the client went away
        for _ in range(200):
            if released:
                break
            await asyncio.sleep(0.05)

    try:
        asyncio.run(scenario())
        assert model.finished.wait(20), "the model stayed blocked in send after the client left"
        assert released == [True] and not model.errors
    finally:
        executor.shutdown(wait=True)
