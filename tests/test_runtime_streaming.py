"""ModelStreamInfer: decoupled textgen streams its tokens in order, each response
flagged with ``triton_final_response``; errors travel in ``error_message`` and
the stream goes on; a cancelled stream leaves the server healthy.

textgen is seeded by the prompt, so the expected tokens are computed here by
running examples/models/textgen's own generator.
"""

from __future__ import annotations

import queue

import grpc
import numpy as np
import pytest
from test_runtime_helpers import (
    RPC_TIMEOUT_S,
    SERVING,
    add_sub_inputs,
    bool_param,
    check_add_sub,
    decode_outputs,
    expected_tokens,
    infer_request,
    open_stub,
)

from meshserve.protos.inference import grpc_service_pb2 as pb

END = object()


@pytest.fixture(scope="module")
def stub(examples_runtime):
    channel, stub = open_stub(examples_runtime.address)
    yield stub
    channel.close()


def _textgen(prompt: str, max_tokens: int | None = None, request_id: str = "", empty_final: bool = False):
    inputs = {"PROMPT": np.array([prompt.encode()], dtype=object)}
    if max_tokens is not None:
        inputs["MAX_TOKENS"] = np.array([max_tokens], np.int32)
    parameters = {"triton_enable_empty_final_response": bool_param(True)} if empty_final else None
    return infer_request("textgen", inputs, datatypes={"PROMPT": "BYTES"}, request_id=request_id,
                         parameters=parameters)


def _stream(stub, requests: list[pb.ModelInferRequest]) -> list[pb.ModelStreamInferResponse]:
    """Send ``requests`` on one stream, half-close, and collect every response until the end."""
    return list(stub.ModelStreamInfer(iter(requests), timeout=RPC_TIMEOUT_S))


def _final(response: pb.ModelStreamInferResponse) -> bool:
    parameters = response.infer_response.parameters
    assert "triton_final_response" in parameters, response
    return parameters["triton_final_response"].bool_param


def _token(response: pb.ModelStreamInferResponse) -> str | None:
    outputs = decode_outputs(response.infer_response)
    if not outputs:
        return None
    assert list(outputs) == ["TOKEN"] and outputs["TOKEN"].shape == (1,)
    return outputs["TOKEN"][0].decode()


def test_tokens_arrive_in_order_and_the_last_one_is_final(stub):
    responses = _stream(stub, [_textgen("The scheduler places", 6, request_id="gen-1")])
    assert all(not r.error_message for r in responses), responses
    assert [r.infer_response.id for r in responses] == ["gen-1"] * 6
    assert [r.infer_response.model_name for r in responses] == ["textgen"] * 6
    assert [_token(r) for r in responses] == expected_tokens("The scheduler places", 6)
    assert [_final(r) for r in responses] == [False] * 5 + [True]


def test_default_max_tokens_is_honoured(stub):
    responses = _stream(stub, [_textgen("GPU memory")])
    assert [_token(r) for r in responses] == expected_tokens("GPU memory", 32)  # default_max_tokens
    assert [_final(r) for r in responses] == [False] * 31 + [True]


def test_empty_final_response_closes_the_request_when_asked_for(stub):
    responses = _stream(stub, [_textgen("Each replica", 4, request_id="e", empty_final=True)])
    assert [_token(r) for r in responses] == [*expected_tokens("Each replica", 4), None]
    assert [_final(r) for r in responses] == [False] * 4 + [True]
    assert not responses[-1].infer_response.outputs and not responses[-1].infer_response.raw_output_contents
    assert responses[-1].infer_response.id == "e"


def test_zero_tokens_still_get_one_final_response(stub):
    for empty_final in (False, True):
        responses = _stream(stub, [_textgen("Nothing", 0, request_id="z", empty_final=empty_final)])
        assert len(responses) == 1
        assert _final(responses[0]) and _token(responses[0]) is None
        assert responses[0].infer_response.id == "z"


def test_two_requests_on_one_stream_each_keep_their_order(stub):
    responses = _stream(stub, [_textgen("The batcher", 5, request_id="a"),
                               _textgen("A model instance", 7, request_id="b", empty_final=True)])
    by_id: dict[str, list] = {"a": [], "b": []}
    for response in responses:
        assert not response.error_message, response
        by_id[response.infer_response.id].append(response)
    assert [_token(r) for r in by_id["a"]] == expected_tokens("The batcher", 5)
    assert [_final(r) for r in by_id["a"]] == [False] * 4 + [True]
    assert [_token(r) for r in by_id["b"]] == [*expected_tokens("A model instance", 7), None]
    assert [_final(r) for r in by_id["b"]] == [False] * 7 + [True]


def test_bad_requests_on_a_stream_answer_error_message_and_the_stream_goes_on(stub):
    missing_prompt = infer_request("textgen", {"MAX_TOKENS": np.array([3], np.int32)}, request_id="bad-1")
    unknown_model = _textgen("hello", 3, request_id="bad-2")
    unknown_model.model_name = "no_such_model"
    too_many_tokens = _textgen("hello", 100_000, request_id="bad-3")  # the predictor raises
    responses = _stream(stub, [missing_prompt, unknown_model, too_many_tokens,
                               _textgen("The stream", 3, request_id="good")])
    errors = {r.infer_response.id: r.error_message for r in responses if r.error_message}
    assert set(errors) == {"bad-1", "bad-2", "bad-3"}, responses
    assert "missing input 'PROMPT'" in errors["bad-1"]
    assert "no_such_model" in errors["bad-2"]
    assert "above the limit" in errors["bad-3"] and "textgen" in errors["bad-3"]
    good = [r for r in responses if r.infer_response.id == "good"]
    assert [_token(r) for r in good] == expected_tokens("The stream", 3)
    assert [_final(r) for r in good] == [False, False, True]


def test_non_decoupled_model_over_the_stream_answers_once_marked_final(stub):
    inputs = add_sub_inputs(batch=2, seed=5)
    for empty_final in (False, True):
        parameters = {"triton_enable_empty_final_response": bool_param(True)} if empty_final else None
        responses = _stream(stub, [infer_request("add_sub", inputs, request_id="s", parameters=parameters)])
        assert len(responses) == 1 and not responses[0].error_message
        assert _final(responses[0]) is True
        outputs = decode_outputs(responses[0].infer_response)
        np.testing.assert_array_equal(outputs["OUTPUT0"], inputs["INPUT0"] + inputs["INPUT1"])
        np.testing.assert_array_equal(outputs["OUTPUT1"], inputs["INPUT0"] - inputs["INPUT1"])


def test_responses_stream_before_the_client_half_closes(stub):
    # The server answers as requests arrive, not after the request stream ends.
    requests: queue.Queue = queue.Queue()

    def request_iterator():
        while (request := requests.get(timeout=RPC_TIMEOUT_S)) is not END:
            yield request

    call = stub.ModelStreamInfer(request_iterator(), timeout=RPC_TIMEOUT_S)
    try:
        requests.put(_textgen("First", 2, request_id="one"))
        first = [next(call), next(call)]
        assert [_token(r) for r in first] == expected_tokens("First", 2)
        requests.put(_textgen("Second", 2, request_id="two"))
        second = [next(call), next(call)]
        assert [r.infer_response.id for r in second] == ["two", "two"]
        assert [_final(r) for r in second] == [False, True]
    finally:
        requests.put(END)
    assert list(call) == []  # half-close: the stream ends


def test_cancelled_stream_leaves_the_server_healthy(stub):
    requests: queue.Queue = queue.Queue()

    def request_iterator():
        while (request := requests.get(timeout=RPC_TIMEOUT_S)) is not END:
            yield request

    call = stub.ModelStreamInfer(request_iterator(), timeout=RPC_TIMEOUT_S)
    requests.put(_textgen("A long answer", 512, request_id="long"))
    received = [next(call) for _ in range(3)]
    assert [_token(r) for r in received] == expected_tokens("A long answer", 3)
    call.cancel()
    requests.put(END)
    with pytest.raises(grpc.RpcError) as info:
        for _ in range(1024):  # bounded: 512 tokens at most were produced
            next(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED

    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=RPC_TIMEOUT_S).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=RPC_TIMEOUT_S).ready
    # textgen's single instance was given back: a new stream is served in full.
    responses = _stream(stub, [_textgen("After the cancel", 4, request_id="next")])
    assert [_token(r) for r in responses] == expected_tokens("After the cancel", 4)
    check_add_sub(stub)


def test_textgen_statistics_count_streams(stub):
    def stats():
        return stub.ModelStatistics(pb.ModelStatisticsRequest(name="textgen"),
                                    timeout=RPC_TIMEOUT_S).model_stats[0]

    before = stats()
    _stream(stub, [_textgen("Counting", 3, request_id="c1"), _textgen("Counting more", 2, request_id="c2")])
    after = stats()
    assert after.inference_stats.success.count - before.inference_stats.success.count == 2
    assert after.inference_stats.success.ns > before.inference_stats.success.ns


# ticker streams slowly: a cancelled stream of this many ticks cannot have finished,
# and if its generator kept running a later request would wait far past RPC_TIMEOUT_S.
LONG_STREAM_TICKS = 10_000
TICK_MS = 5


@pytest.fixture(scope="module")
def ticker_stub():
    from conftest import RuntimeProcess

    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(SERVING),
                              "--model", "ticker"])
    channel, stub = open_stub(process.address)
    yield stub
    channel.close()
    process.stop()


def _ticks(count: int, request_id: str = "") -> pb.ModelInferRequest:
    return infer_request("ticker", {"COUNT": np.array([count], np.int32),
                                    "TICK_MS": np.array([TICK_MS], np.int32)}, request_id=request_id)


def test_cancelling_a_stream_mid_way_stops_its_generator(ticker_stub):
    requests: queue.Queue = queue.Queue()

    def request_iterator():
        while (request := requests.get(timeout=RPC_TIMEOUT_S)) is not END:
            yield request

    call = ticker_stub.ModelStreamInfer(request_iterator(), timeout=RPC_TIMEOUT_S)
    requests.put(_ticks(LONG_STREAM_TICKS, "long"))
    received = [decode_outputs(next(call).infer_response)["TICK"].tolist() for _ in range(3)]
    assert received == [[0], [1], [2]]
    call.cancel()
    requests.put(END)
    with pytest.raises(grpc.RpcError) as info:
        for _ in range(LONG_STREAM_TICKS):  # bounded
            next(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED

    # The single instance is free again and the cancelled generator produced no more.
    responses = _stream(ticker_stub, [_ticks(2, "after")])
    assert [decode_outputs(r.infer_response)["TICK"].tolist() for r in responses] == [[0], [1]]
    assert [_final(r) for r in responses] == [False, True]
    produced_by_cancelled = int(decode_outputs(responses[0].infer_response)["PRODUCED"][0]) - 1
    assert 3 <= produced_by_cancelled < LONG_STREAM_TICKS
    assert ticker_stub.ServerReady(pb.ServerReadyRequest(), timeout=RPC_TIMEOUT_S).ready


def test_model_infer_on_a_decoupled_model_is_failed_precondition(ticker_stub):
    with pytest.raises(grpc.RpcError) as info:
        ticker_stub.ModelInfer(_ticks(1), timeout=RPC_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "ticker" in info.value.details() and "ModelStreamInfer" in info.value.details()


def _failing_ticks(count: int, fail_after: int, request_id: str, empty_final: bool = False):
    request = _ticks(count, request_id)
    request.inputs.add(name="FAIL_AFTER", datatype="INT32", shape=[1])
    request.raw_input_contents.append(np.array([fail_after], np.int32).tobytes())
    if empty_final:
        request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


def test_predictor_failing_mid_stream_with_empty_final_keeps_every_tick_then_errors(ticker_stub):
    responses = _stream(ticker_stub, [_failing_ticks(5, 3, "fail-e", empty_final=True),
                                      _ticks(2, "fine")])
    failing = [r for r in responses if r.infer_response.id == "fail-e"]
    ticks = [decode_outputs(r.infer_response)["TICK"].tolist() for r in failing if not r.error_message]
    assert ticks == [[0], [1], [2]]
    assert "ticker failed after 3 ticks" in failing[-1].error_message
    assert "RuntimeError" in failing[-1].error_message
    fine = [r for r in responses if r.infer_response.id == "fine"]
    assert [_final(r) for r in fine] == [False, True]


def test_predictor_failing_mid_stream_keeps_every_tick_then_errors(ticker_stub):
    responses = _stream(ticker_stub, [_failing_ticks(5, 3, "fail")])
    ticks = [decode_outputs(r.infer_response)["TICK"].tolist() for r in responses if not r.error_message]
    assert ticks == [[0], [1], [2]]
    assert "ticker failed after 3 ticks" in responses[-1].error_message
