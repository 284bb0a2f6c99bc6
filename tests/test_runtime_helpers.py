"""Shared helpers of the runtime component tests (``tests/test_runtime_*.py``); no tests here.

The tests talk to real ``python -m meshserve.runtime`` processes (see conftest.py)
through the generated stubs in ``protos.inference``, never through a client
library, so what they check is the wire protocol itself.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import sys
import time

import grpc
import numpy as np
import pytest

from meshserve.common import tensors
from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples" / "models"
TEST_MODELS = pathlib.Path(__file__).resolve().parent / "models"
SERVING = TEST_MODELS / "serving"
BAD_CONFIGS = TEST_MODELS / "bad_configs"

# Bounds a hung server; not a performance claim (loaded 2-core CI machine).
RPC_TIMEOUT_S = 30.0
# How long a polled condition (a statistic reaching a value) may take to hold.
WAIT_TIMEOUT_S = 20.0
# Size of every add_sub input item (dims [16] in its config).
ADD_SUB_WIDTH = 16


def open_stub(address: str) -> tuple[grpc.Channel, pb_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT_S)
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def load_module(path: pathlib.Path, name: str):
    """Import a file by path without writing __pycache__ into a model repository."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    previous = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = previous
    return module


@functools.cache
def _textgen_predictor():
    """examples' textgen Predictor, built here with the parameters of its config.pbtxt."""
    from google.protobuf import text_format

    from meshserve.protos.inference import model_config_pb2 as mc

    model_dir = EXAMPLES / "textgen"
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    module = load_module(model_dir / "1" / "model.py", "textgen_expected")
    return module.Predictor({
        "name": "textgen",
        "model_dir": str(model_dir / "1"),
        "parameters": {key: value.string_value for key, value in config.parameters.items()},
    })


def expected_tokens(prompt: str, count: int) -> list[str]:
    """The tokens textgen must stream for ``prompt``: generation is seeded by the prompt."""
    return list(_textgen_predictor().generate(prompt, count))


def infer_request(
    model: str,
    inputs: dict[str, np.ndarray],
    *,
    datatypes: dict[str, str] | None = None,
    raw: bool = True,
    outputs: list[str] | None = None,
    parameters: dict[str, pb.InferParameter] | None = None,
    request_id: str = "",
    version: str = "",
) -> pb.ModelInferRequest:
    """A ModelInferRequest carrying ``inputs`` raw (default) or in typed ``contents``."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in inputs.items():
        datatype = (datatypes or {}).get(name) or tensors.datatype_of(array)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if raw:
            request.raw_input_contents.append(tensors.to_raw(array, datatype))
        else:
            tensors.fill_contents(tensor.contents, array, datatype)
    for name in outputs or []:
        request.outputs.add(name=name)
    for key, value in (parameters or {}).items():
        request.parameters[key].CopyFrom(value)
    return request


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The outputs of a response, decoded from ``raw_output_contents``."""
    assert len(response.raw_output_contents) == len(response.outputs), response
    return {
        tensor.name: tensors.from_raw(tensor.datatype, list(tensor.shape), raw)
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def add_sub_inputs(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "INPUT0": rng.standard_normal((batch, ADD_SUB_WIDTH)).astype(np.float32),
        "INPUT1": rng.standard_normal((batch, ADD_SUB_WIDTH)).astype(np.float32),
    }


def check_add_sub(stub, batch: int = 1, seed: int = 0) -> None:
    """One good add_sub request; its outputs are the sum and the difference."""
    inputs = add_sub_inputs(batch, seed)
    response = stub.ModelInfer(infer_request("add_sub", inputs), timeout=RPC_TIMEOUT_S)
    outputs = decode_outputs(response)
    np.testing.assert_array_equal(outputs["OUTPUT0"], inputs["INPUT0"] + inputs["INPUT1"])
    np.testing.assert_array_equal(outputs["OUTPUT1"], inputs["INPUT0"] - inputs["INPUT1"])


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """The RpcError that ``call(*args, **kwargs)`` must raise."""
    kwargs.setdefault("timeout", RPC_TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def assert_status(error: grpc.RpcError, code: grpc.StatusCode, *fragments: str) -> None:
    """``error`` has status ``code`` and its message contains every fragment."""
    assert error.code() == code, f"expected {code}, got {error.code()}: {error.details()}"
    for fragment in fragments:
        assert fragment in (error.details() or ""), f"{fragment!r} not in {error.details()!r}"


def model_stats(stub, name: str, version: str = "") -> pb.ModelStatistics:
    response = stub.ModelStatistics(
        pb.ModelStatisticsRequest(name=name, version=version), timeout=RPC_TIMEOUT_S
    )
    assert len(response.model_stats) == 1, response
    return response.model_stats[0]


def wait_until(predicate, what: str, timeout: float = WAIT_TIMEOUT_S, interval: float = 0.01):
    """Poll ``predicate`` until it returns a truthy value (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_executing(stub, model: str, started_before: int, count: int = 1) -> None:
    """Wait until ``count`` more executions of ``model`` have started (its queue time is
    recorded when a request's batch starts, so the queue count counts started requests)."""
    wait_until(
        lambda: model_stats(stub, model).inference_stats.queue.count >= started_before + count,
        f"{count} request(s) of '{model}' to start executing",
    )


def int_param(value: int) -> pb.InferParameter:
    return pb.InferParameter(int64_param=value)


def bool_param(value: bool) -> pb.InferParameter:
    return pb.InferParameter(bool_param=value)


def infer_concurrently(address: str, requests: list[pb.ModelInferRequest]) -> list:
    """Send every request at once on one grpc.aio channel; each result is the response
    or the grpc.aio.AioRpcError it failed with, in request order."""
    import asyncio

    async def send_all():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await asyncio.wait_for(channel.channel_ready(), RPC_TIMEOUT_S)
            calls = [stub.ModelInfer(request, timeout=RPC_TIMEOUT_S) for request in requests]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(send_all())
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, grpc.RpcError):
            raise result
    return results
