"""Hostile and unlucky input at the proxy (issue 8, items 6, 8 and 17), in front of a REAL runtime.

- A model the route table lists with no ready replica is UNAVAILABLE (retried
  by clients), not NOT_FOUND; only a model the table does not list is.
- A request naming no model in the middle of a stream is answered in the
  stream, as the runtime answers it, and the stream goes on.
- Garbage bytes in the middle of a stream end it at once with
  INVALID_ARGUMENT, whatever the replica would make of them.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import EXAMPLES, RuntimeProcess
from test_proxy_helpers import RPC_TIMEOUT_S, ProxyRig, route
from test_runtime_helpers import add_sub_inputs, assert_status, expected_tokens, infer_request, open_stub, rpc_error

from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.proxy.routes import RouteTable

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture(scope="module")
def replica():
    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(EXAMPLES), "--model", "textgen"])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def rig(loop, replica):
    """textgen on the replica; add_sub deployed with no ready replica (a route with no endpoint)."""
    proxy_rig = ProxyRig(loop, route("textgen", ("r0", replica.address)), route("add_sub"))
    yield proxy_rig
    proxy_rig.close()


@pytest.fixture(scope="module")
def stub(rig):
    channel, stub = open_stub(rig.address)
    yield stub
    channel.close()


def _textgen(prompt: str, max_tokens: int, request_id: str) -> pb.ModelInferRequest:
    return infer_request("textgen", {"PROMPT": np.array([prompt.encode()], dtype=object),
                                     "MAX_TOKENS": np.array([max_tokens], np.int32)},
                         datatypes={"PROMPT": "BYTES"}, request_id=request_id)


# -- item 6: deployed but not ready ------------------------------------------------------------


def test_a_route_with_no_endpoint_is_kept_in_the_table():
    table = RouteTable.from_proto(mesh.RouteTable(routes=[route("add_sub")]))
    assert table.models() == ["add_sub"] and table.routes_for("add_sub")[0].endpoints == ()


def test_a_model_with_no_ready_replica_is_unavailable_and_an_unlisted_one_not_found(stub):
    error = rpc_error(stub.ModelInfer, infer_request("add_sub", add_sub_inputs()))
    assert_status(error, grpc.StatusCode.UNAVAILABLE, "no ready replica of model 'add_sub'")
    error = rpc_error(stub.ModelInfer, infer_request("no_such_model", add_sub_inputs()))
    assert_status(error, grpc.StatusCode.NOT_FOUND, "unknown model 'no_such_model'")
    assert not stub.ModelReady(pb.ModelReadyRequest(name="add_sub"), timeout=RPC_TIMEOUT_S).ready


def test_a_model_with_no_ready_replica_is_unavailable_in_a_stream_and_the_stream_goes_on(stub):
    responses = list(stub.ModelStreamInfer(iter([infer_request("add_sub", add_sub_inputs(), request_id="a"),
                                                 _textgen("after", 2, "t")]), timeout=RPC_TIMEOUT_S))
    assert responses[0].error_message == "UNAVAILABLE: no ready replica of model 'add_sub'"
    assert responses[0].infer_response.id == "a"
    assert [r.infer_response.id for r in responses[1:]] == ["t", "t"]


# -- item 17: no model name mid-stream -----------------------------------------------------------


def test_a_request_naming_no_model_mid_stream_is_answered_in_the_stream_and_the_stream_goes_on(stub):
    requests = [_textgen("before", 2, "t1"), pb.ModelInferRequest(id="nameless"), _textgen("after", 3, "t2")]
    responses = list(stub.ModelStreamInfer(iter(requests), timeout=RPC_TIMEOUT_S))
    errors = [r for r in responses if r.error_message]
    assert len(errors) == 1 and errors[0].error_message.startswith("INVALID_ARGUMENT")
    assert "names no model" in errors[0].error_message and errors[0].infer_response.id == "nameless"
    tokens = [r for r in responses if r.infer_response.id == "t2"]
    assert len(tokens) == len(expected_tokens("after", 3))


# -- item 8: garbage mid-stream ------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [
    b"\x0a\x07textgen\x22\x03abc",     # names textgen, so it would be forwarded; its input is not a message
    b"\xff\xff\xff\xff garbage",          # not even the head parses
], ids=["passes-the-head-scan", "unparseable-head"])
def test_garbage_mid_stream_ends_the_stream_with_invalid_argument_at_once(rig, garbage):
    first = _textgen("first", 2, "t1").SerializeToString()
    with grpc.insecure_channel(rig.address) as channel:
        call = channel.stream_stream(STREAM)
        responses = []
        with pytest.raises(grpc.RpcError) as info:
            # The deadline only bounds a regression: the stream must end long before it.
            for response in call(iter([first, garbage, first]), timeout=RPC_TIMEOUT_S):
                responses.append(response)
    assert_status(info.value, grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
