"""Hostile requests at a real runtime: the right status, a bounded message, no traceback, no hang.

Raw bytes travel over the channel's generic calls (no serializer), so what
the server gets is exactly what a hostile client would send. After every
refusal the same server still answers a good request.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from test_runtime_helpers import (
    RPC_TIMEOUT_S,
    add_sub_inputs,
    assert_status,
    check_add_sub,
    infer_request,
    open_stub,
    rpc_error,
)

from meshserve.common.errors import MAX_STATUS_MESSAGE_BYTES
from meshserve.protos.inference import grpc_service_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
# Not a ModelInferRequest: field 15, wire type 7 (no such wire type).
GARBAGE = b"\x7f\xff\xff\xff\xff garbage"
# A shape this long echoed whole is ~30 KB: over gRPC's 8 KiB metadata limit.
MANY_DIMS = 10_000


@pytest.fixture(scope="module")
def channel(examples_runtime):
    channel, _ = open_stub(examples_runtime.address)
    yield channel
    channel.close()


@pytest.fixture(scope="module")
def stub(channel):
    from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc

    return pb_grpc.GRPCInferenceServiceStub(channel)


def _no_traceback_since(runtime, lines_before: int) -> None:
    logged = "".join(runtime.output[lines_before:])
    assert "Traceback" not in logged, logged


def _classification(value: pb.InferParameter) -> pb.ModelInferRequest:
    request = infer_request("add_sub", add_sub_inputs())
    request.outputs.add(name="OUTPUT0").parameters["classification"].CopyFrom(value)
    return request


def _timeout(value: pb.InferParameter) -> pb.ModelInferRequest:
    return infer_request("add_sub", add_sub_inputs(), parameters={"timeout": value})


HOSTILE_PARAMETERS = {
    "classification 'abc'": (_classification, pb.InferParameter(string_param="abc"), "classification"),
    "classification -5": (_classification, pb.InferParameter(int64_param=-5), "classification"),
    "classification NaN": (_classification, pb.InferParameter(double_param=math.nan), "classification"),
    "classification inf": (_classification, pb.InferParameter(double_param=math.inf), "classification"),
    "classification 2.5": (_classification, pb.InferParameter(double_param=2.5), "classification"),
    "timeout NaN": (_timeout, pb.InferParameter(double_param=math.nan), "timeout"),
    "timeout inf": (_timeout, pb.InferParameter(double_param=math.inf), "timeout"),
    "timeout -1": (_timeout, pb.InferParameter(int64_param=-1), "timeout"),
}


@pytest.mark.parametrize("case", list(HOSTILE_PARAMETERS))
def test_hostile_parameter_is_invalid_argument_without_traceback(examples_runtime, stub, case):
    build, value, fragment = HOSTILE_PARAMETERS[case]
    lines_before = len(examples_runtime.output)
    error = rpc_error(stub.ModelInfer, build(value))
    assert_status(error, INVALID, fragment)
    check_add_sub(stub, seed=3)
    _no_traceback_since(examples_runtime, lines_before)


def test_classification_of_a_bytes_output_is_invalid_argument(examples_runtime, stub):
    items = np.array([b"a", b"b"], dtype=object)
    request = infer_request("echo_bytes", {"INPUT0": items}, datatypes={"INPUT0": "BYTES"})
    request.outputs.add(name="OUTPUT0").parameters["classification"].int64_param = 1
    lines_before = len(examples_runtime.output)
    assert_status(rpc_error(stub.ModelInfer, request), INVALID, "OUTPUT0", "classification")
    _no_traceback_since(examples_runtime, lines_before)


def test_whole_number_classification_still_ranks(stub):
    request = _classification(pb.InferParameter(double_param=2.0))
    response = stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    assert list(response.outputs[0].shape) == [1, 2]


def test_garbage_model_infer_bytes_are_invalid_argument(examples_runtime, channel, stub):
    lines_before = len(examples_runtime.output)
    error = rpc_error(channel.unary_unary(MODEL_INFER), GARBAGE)
    assert_status(error, INVALID, "malformed", "ModelInfer")
    check_add_sub(stub, seed=4)
    _no_traceback_since(examples_runtime, lines_before)


def test_garbage_in_the_middle_of_a_stream_ends_it_with_invalid_argument(channel, stub):
    good = infer_request("add_sub", add_sub_inputs(), request_id="before").SerializeToString()
    later = infer_request("add_sub", add_sub_inputs(), request_id="after").SerializeToString()
    call = channel.stream_stream(MODEL_STREAM_INFER)(iter([good, GARBAGE, later]), timeout=RPC_TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
    # Before the fix the stream hung until this deadline: DEADLINE_EXCEEDED.
    assert_status(info.value, INVALID, "malformed", "ModelStreamInfer")
    check_add_sub(stub, seed=5)


def test_error_echoing_a_huge_shape_reaches_the_client_bounded(stub):
    request = infer_request("add_sub", add_sub_inputs())
    request.inputs[0].shape[:] = [1] * MANY_DIMS
    error = rpc_error(stub.ModelInfer, request)
    # Before the fix: RESOURCE_EXHAUSTED "metadata size exceeds hard limit" instead of the error.
    assert_status(error, INVALID, "input 'INPUT0' has shape", "bytes cut", "expects [-1, 16]")
    assert len(error.details().encode()) <= MAX_STATUS_MESSAGE_BYTES


def test_error_in_a_stream_response_is_bounded(stub):
    request = infer_request("add_sub", add_sub_inputs(), request_id="huge-shape")
    request.inputs[0].shape[:] = [1] * MANY_DIMS
    (response,) = list(stub.ModelStreamInfer(iter([request]), timeout=RPC_TIMEOUT_S))
    assert response.error_message.startswith("INVALID_ARGUMENT: input 'INPUT0' has shape")
    assert len(response.error_message.encode()) <= MAX_STATUS_MESSAGE_BYTES
