"""Every KServe v2 datatype crosses the wire both ways, raw and in typed contents.

One runtime serves tests/models/serving/identity: one optional input
``IN_<T>`` and one output ``OUT_<T>`` per datatype, each echoing its input.
Answers always come back in ``raw_output_contents`` (as Triton's do).
"""

from __future__ import annotations

import grpc
import ml_dtypes
import numpy as np
import pytest
from conftest import RuntimeProcess
from test_runtime_helpers import (
    RPC_TIMEOUT_S,
    SERVING,
    assert_status,
    bool_param,
    decode_outputs,
    infer_request,
    int_param,
    open_stub,
    rpc_error,
)

from meshserve.protos.inference import grpc_service_pb2 as pb

# Per datatype: values at the edges of its range, shaped [3].
VALUES: dict[str, np.ndarray] = {
    "BOOL": np.array([True, False, True]),
    "UINT8": np.array([0, 1, 255], np.uint8),
    "UINT16": np.array([0, 1, 65535], np.uint16),
    "UINT32": np.array([0, 1, 2**32 - 1], np.uint32),
    "UINT64": np.array([0, 1, 2**64 - 1], np.uint64),
    "INT8": np.array([-128, 0, 127], np.int8),
    "INT16": np.array([-(2**15), 0, 2**15 - 1], np.int16),
    "INT32": np.array([-(2**31), 0, 2**31 - 1], np.int32),
    "INT64": np.array([-(2**63), 0, 2**63 - 1], np.int64),
    "FP16": np.array([0.0, -1.5, 65504.0], np.float16),
    "FP32": np.array([0.0, -1.5, 3.4e38], np.float32),
    "FP64": np.array([0.0, -1.5, 1.0e308], np.float64),
    "BF16": np.array([0.0, -1.5, 3.0e38], ml_dtypes.bfloat16),
    "BYTES": np.array([b"", b"\x00\xff\x00", "h\u00e9llo".encode()], dtype=object),
}
RAW_ONLY = ("FP16", "BF16")  # no typed contents field exists for them


@pytest.fixture(scope="module")
def stub():
    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(SERVING),
                              "--model", "identity"])
    channel, stub = open_stub(process.address)
    yield stub
    channel.close()
    process.stop()


def _identity(stub, datatypes: list[str], *, raw: bool = True, outputs=True, **kwargs):
    inputs = {f"IN_{t}": VALUES[t] for t in datatypes}
    request = infer_request(
        "identity", inputs, datatypes={f"IN_{t}": t for t in datatypes}, raw=raw,
        outputs=[f"OUT_{t}" for t in datatypes] if outputs else None, **kwargs,
    )
    return stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)


def _assert_echoed(response, datatypes: list[str]) -> None:
    assert sorted(t.name for t in response.outputs) == sorted(f"OUT_{t}" for t in datatypes)
    assert not any(t.HasField("contents") for t in response.outputs)  # answers are raw
    outputs = decode_outputs(response)
    for tensor in response.outputs:
        datatype = tensor.name[len("OUT_"):]
        assert tensor.datatype == datatype
        assert list(tensor.shape) == [3]
        got, want = outputs[tensor.name], VALUES[datatype]
        assert got.dtype == want.dtype, datatype
        np.testing.assert_array_equal(got, want, err_msg=datatype)


@pytest.mark.parametrize("datatype", list(VALUES))
def test_raw_input_round_trips(stub, datatype):
    _assert_echoed(_identity(stub, [datatype]), [datatype])


@pytest.mark.parametrize("datatype", [t for t in VALUES if t not in RAW_ONLY])
def test_typed_contents_input_round_trips(stub, datatype):
    _assert_echoed(_identity(stub, [datatype], raw=False), [datatype])


@pytest.mark.parametrize("datatype", RAW_ONLY)
def test_typed_contents_are_refused_for_raw_only_datatypes(stub, datatype):
    request = pb.ModelInferRequest(model_name="identity")
    tensor = request.inputs.add(name=f"IN_{datatype}", datatype=datatype, shape=[3])
    tensor.contents.fp32_contents.extend([0.0, -1.5, 2.0])
    error = rpc_error(stub.ModelInfer, request)
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, f"IN_{datatype}", datatype,
                  "raw_input_contents")
    _assert_echoed(_identity(stub, [datatype]), [datatype])  # still serving


def test_every_datatype_in_one_raw_request_without_requested_outputs(stub):
    _assert_echoed(_identity(stub, list(VALUES), outputs=False), list(VALUES))


def test_every_contents_datatype_in_one_typed_request(stub):
    datatypes = [t for t in VALUES if t not in RAW_ONLY]
    _assert_echoed(_identity(stub, datatypes, raw=False), datatypes)


def test_requested_outputs_filter_the_response(stub):
    inputs = {"IN_INT32": VALUES["INT32"], "IN_FP64": VALUES["FP64"], "IN_BYTES": VALUES["BYTES"]}
    response = stub.ModelInfer(infer_request("identity", inputs, outputs=["OUT_FP64"]),
                               timeout=RPC_TIMEOUT_S)
    assert [t.name for t in response.outputs] == ["OUT_FP64"]
    assert len(response.raw_output_contents) == 1
    np.testing.assert_array_equal(decode_outputs(response)["OUT_FP64"], VALUES["FP64"])


def test_unknown_request_parameters_are_tolerated(stub):
    parameters = {
        "not_a_triton_parameter": pb.InferParameter(string_param="anything"),
        "priority": int_param(3),
        "my_flag": bool_param(True),
        "temperature": pb.InferParameter(double_param=0.5),
    }
    _assert_echoed(_identity(stub, ["FP32"], parameters=parameters), ["FP32"])


def test_zero_length_tensors_round_trip(stub):
    request = infer_request("identity", {"IN_FP32": np.zeros(0, np.float32),
                                         "IN_BYTES": np.array([], dtype=object)},
                            datatypes={"IN_BYTES": "BYTES"}, outputs=["OUT_FP32", "OUT_BYTES"])
    outputs = decode_outputs(stub.ModelInfer(request, timeout=RPC_TIMEOUT_S))
    assert outputs["OUT_FP32"].shape == (0,) and outputs["OUT_BYTES"].shape == (0,)


def test_typed_contents_out_of_range_for_the_datatype_are_refused(stub):
    request = pb.ModelInferRequest(model_name="identity")
    request.inputs.add(name="IN_INT8", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    request.outputs.add(name="OUT_INT8")
    error = rpc_error(stub.ModelInfer, request)
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "IN_INT8")
