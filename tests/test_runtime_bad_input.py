"""Bad requests get the exact status code and a message naming the tensor and the problem.

After every refusal the same server still answers a good request: a bad
input fails only its own request.
"""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest
from test_runtime_helpers import (
    EXAMPLES,
    RPC_TIMEOUT_S,
    add_sub_inputs,
    assert_status,
    check_add_sub,
    decode_outputs,
    infer_request,
    open_stub,
    rpc_error,
)

from meshserve.common import tensors
from meshserve.protos.inference import grpc_service_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def stub(examples_runtime):
    channel, stub = open_stub(examples_runtime.address)
    yield stub
    channel.close()


def _add_sub(**changes) -> pb.ModelInferRequest:
    return infer_request("add_sub", add_sub_inputs(), **changes)


def _unknown_model():
    return infer_request("no_such_model", add_sub_inputs())


def _unknown_version():
    return _add_sub(version="7")


def _missing_input():
    return infer_request("add_sub", {"INPUT0": add_sub_inputs()["INPUT0"]})


def _unexpected_input():
    return infer_request("add_sub", {**add_sub_inputs(), "INPUT2": np.zeros((1, 16), np.float32)})


def _duplicate_input():
    request = _add_sub()
    request.inputs.add().CopyFrom(request.inputs[0])
    request.raw_input_contents.append(request.raw_input_contents[0])
    return request


def _wrong_datatype():
    inputs = add_sub_inputs()
    return infer_request("add_sub", {"INPUT0": inputs["INPUT0"].astype(np.float64),
                                     "INPUT1": inputs["INPUT1"]})


def _wrong_shape():
    inputs = add_sub_inputs()
    return infer_request("add_sub", {"INPUT0": inputs["INPUT0"][:, :15], "INPUT1": inputs["INPUT1"]})


def _no_batch_axis():
    inputs = add_sub_inputs()
    return infer_request("add_sub", {name: array[0] for name, array in inputs.items()})


def _scalar():
    request = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[])
        request.raw_input_contents.append(np.float32(1).tobytes())
    return request


def _batch_over_max():
    return infer_request("add_sub", add_sub_inputs(batch=65))


def _batch_sizes_differ():
    inputs = add_sub_inputs(batch=2)
    return infer_request("add_sub", {"INPUT0": inputs["INPUT0"], "INPUT1": inputs["INPUT1"][:1]})


def _raw_size_mismatch():
    request = _add_sub()
    request.raw_input_contents[1] = request.raw_input_contents[1][:-4]
    return request


def _raw_count_mismatch():
    request = _add_sub()
    del request.raw_input_contents[1]
    return request


def _raw_and_contents():
    request = _add_sub()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 16)
    return request


def _typed_contents_of_two_types():
    """FP32 values in fp32_contents plus stray bytes_contents: which one did the client mean?"""
    request = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
        tensor.contents.fp32_contents.extend([1.0] * 16)
    request.inputs[0].contents.bytes_contents.append(b"stray")
    return request


def _contents_count_mismatch():
    request = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 16]).contents.fp32_contents.extend([1.0] * 15)
    return request


def _bytes(shape, raw: bytes):
    request = pb.ModelInferRequest(model_name="echo_bytes")
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=shape)
    request.raw_input_contents.append(raw)
    return request


def _bytes_truncated_prefix():
    return _bytes([2], struct.pack("<I", 2) + b"ok" + b"\x05\x00")


def _bytes_length_past_end():
    return _bytes([1], struct.pack("<I", 10) + b"short")


def _bytes_too_few_elements():
    return _bytes([3], struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b")


def _bytes_too_many_elements():
    return _bytes([1], struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b")


def _bytes_more_elements_than_a_request_may_create():
    count = tensors.MAX_BYTES_ELEMENTS + 1  # 16 MiB of empty elements
    return _bytes([count], bytes(4 * count))


def _unknown_output():
    return _add_sub(outputs=["OUTPUT9"])


def _bad_timeout_parameter():
    return _add_sub(parameters={"timeout": pb.InferParameter(string_param="soon")})


def _decoupled_model():
    prompt = np.array([b"hello"], dtype=object)
    return infer_request("textgen", {"PROMPT": prompt}, datatypes={"PROMPT": "BYTES"})


CASES = {
    "unknown model": (_unknown_model, grpc.StatusCode.NOT_FOUND, ["no_such_model"]),
    "unknown version": (_unknown_version, grpc.StatusCode.NOT_FOUND, ["add_sub", "'7'"]),
    "missing input": (_missing_input, INVALID, ["missing input 'INPUT1'", "add_sub"]),
    "unexpected input": (_unexpected_input, INVALID, ["unexpected input 'INPUT2'"]),
    "duplicate input": (_duplicate_input, INVALID, ["'INPUT0'", "twice"]),
    "wrong datatype": (_wrong_datatype, INVALID, ["'INPUT0'", "FP64", "FP32"]),
    "wrong shape": (_wrong_shape, INVALID, ["'INPUT0'", "[1, 15]", "[-1, 16]"]),
    "item without batch axis": (_no_batch_axis, INVALID, ["'INPUT0'", "[16]", "[-1, 16]"]),
    "scalar without batch axis": (_scalar, INVALID, ["'INPUT0'", "batch dimension"]),
    "batch over max_batch_size": (_batch_over_max, INVALID, ["'INPUT0'", "65", "64"]),
    "batch sizes differ": (_batch_sizes_differ, INVALID, ["'INPUT1'", "batch size 1", "2"]),
    "raw size mismatch": (_raw_size_mismatch, INVALID, ["'INPUT1'", "60 bytes", "64"]),
    "raw count != input count": (_raw_count_mismatch, INVALID, ["2 inputs", "1 raw_input_contents"]),
    "raw and typed contents": (_raw_and_contents, INVALID, ["'INPUT0'", "raw_input_contents"]),
    "typed contents of two types": (_typed_contents_of_two_types, INVALID,
                                    ["'INPUT0'", "bytes_contents", "fp32_contents"]),
    "contents count mismatch": (_contents_count_mismatch, INVALID, ["'INPUT0'", "15 elements", "16"]),
    "BYTES truncated length prefix": (_bytes_truncated_prefix, INVALID, ["'INPUT0'", "truncated"]),
    "BYTES length past the end": (_bytes_length_past_end, INVALID, ["'INPUT0'", "10 bytes"]),
    "BYTES too few elements": (_bytes_too_few_elements, INVALID, ["'INPUT0'", "2 elements", "[3]"]),
    "BYTES too many elements": (_bytes_too_many_elements, INVALID, ["'INPUT0'", "2 elements", "[1]"]),
    "BYTES elements over the limit": (_bytes_more_elements_than_a_request_may_create, INVALID,
                                      ["'INPUT0'", f"at most {tensors.MAX_BYTES_ELEMENTS}"]),
    "unknown requested output": (_unknown_output, INVALID, ["'OUTPUT9'", "OUTPUT0"]),
    "non-numeric timeout": (_bad_timeout_parameter, INVALID, ["timeout"]),
    "ModelInfer on a decoupled model": (_decoupled_model, grpc.StatusCode.FAILED_PRECONDITION,
                                        ["textgen", "ModelStreamInfer"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_is_refused_and_the_server_keeps_serving(stub, case):
    build, code, fragments = CASES[case]
    error = rpc_error(stub.ModelInfer, build())
    assert_status(error, code, *fragments)
    check_add_sub(stub, batch=3, seed=len(case))


def test_failed_validation_is_not_counted_as_an_execution(stub):
    before = stub.ModelStatistics(pb.ModelStatisticsRequest(name="add_sub"), timeout=RPC_TIMEOUT_S)
    rpc_error(stub.ModelInfer, _wrong_shape())
    after = stub.ModelStatistics(pb.ModelStatisticsRequest(name="add_sub"), timeout=RPC_TIMEOUT_S)
    assert after.model_stats[0].execution_count == before.model_stats[0].execution_count


def test_good_bytes_request_round_trips(stub):
    items = np.array([b"", b"\x00", b"\xff\xfe", "\u00fc".encode()], dtype=object)
    response = stub.ModelInfer(infer_request("echo_bytes", {"INPUT0": items}, datatypes={"INPUT0": "BYTES"}),
                               timeout=RPC_TIMEOUT_S)
    np.testing.assert_array_equal(decode_outputs(response)["OUTPUT0"], items)


# Small enough that a 16 KiB element overflows it, large enough for every RPC's normal traffic.
SMALL_MESSAGE_BYTES = 4096


@pytest.fixture(scope="module")
def small_message_stub():
    from conftest import RuntimeProcess

    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(EXAMPLES),
                              "--model", "echo_bytes", "--max-message-bytes", str(SMALL_MESSAGE_BYTES)])
    channel, stub = open_stub(process.address)
    yield stub
    channel.close()
    process.stop()


def test_oversize_message_is_resource_exhausted(small_message_stub):
    big = np.array([b"x" * (4 * SMALL_MESSAGE_BYTES)], dtype=object)
    error = rpc_error(small_message_stub.ModelInfer,
                      infer_request("echo_bytes", {"INPUT0": big}, datatypes={"INPUT0": "BYTES"}))
    assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert str(SMALL_MESSAGE_BYTES) in error.details() or "larger than max" in error.details()

    small = np.array([b"fits"], dtype=object)
    response = small_message_stub.ModelInfer(
        infer_request("echo_bytes", {"INPUT0": small}, datatypes={"INPUT0": "BYTES"}), timeout=RPC_TIMEOUT_S)
    np.testing.assert_array_equal(decode_outputs(response)["OUTPUT0"], small)

