"""Scheduling under load: dynamic batches, batching off, bounded queues, queue
timeouts, concurrent instances and a failing predictor, proved from outside by
results and ModelStatistics.

Models: examples' add_sub (dynamic batching) and tests/models/serving's slow
(one instance, queue of 2), sleeper (two instances), doubler (batched input,
no dynamic_batching), fragile (raises on negative input), pair (two
instances meeting at a Barrier) and ragged (dims [-1], dynamic batching).
"""

from __future__ import annotations

import collections
import time

import grpc
import numpy as np
import pytest
from conftest import RuntimeProcess
from test_runtime_helpers import (
    RPC_TIMEOUT_S,
    SERVING,
    add_sub_inputs,
    assert_status,
    decode_outputs,
    infer_concurrently,
    infer_request,
    int_param,
    model_stats,
    open_stub,
    rpc_error,
    wait_executing,
)

# add_sub under load: requests per round and at most this many rounds until a
# batch of more than one request is seen (normally the first round shows it).
CONCURRENT_REQUESTS = 64
MAX_ROUNDS = 5


@pytest.fixture(scope="module")
def serving():
    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(SERVING),
                              *[arg for model in ("slow", "sleeper", "doubler", "fragile", "pair", "ragged")
                                for arg in ("--model", model)]])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def stub(serving):
    channel, stub = open_stub(serving.address)
    yield stub
    channel.close()


def _delay(model: str, delay_ms: int, **kwargs):
    shape = (1, 1) if model == "slow" else (1,)  # slow batches (max_batch_size 1), sleeper does not
    return infer_request(model, {"DELAY_MS": np.full(shape, delay_ms, np.int32)}, **kwargs)


def test_concurrent_requests_are_batched(examples_runtime):
    channel, stub = open_stub(examples_runtime.address)
    with channel:
        before = model_stats(stub, "add_sub")
        for round_index in range(MAX_ROUNDS):
            inputs = [add_sub_inputs(batch=1, seed=1000 * round_index + i) for i in range(CONCURRENT_REQUESTS)]
            results = infer_concurrently(examples_runtime.address,
                                         [infer_request("add_sub", item) for item in inputs])
            for item, result in zip(inputs, results, strict=True):
                assert not isinstance(result, grpc.RpcError), result
                outputs = decode_outputs(result)  # each request gets its own slice back
                np.testing.assert_array_equal(outputs["OUTPUT0"], item["INPUT0"] + item["INPUT1"])
                np.testing.assert_array_equal(outputs["OUTPUT1"], item["INPUT0"] - item["INPUT1"])
            after = model_stats(stub, "add_sub")
            if any(batch.batch_size > 1 for batch in after.batch_stats):
                break
        requests = CONCURRENT_REQUESTS * (round_index + 1)
        assert after.inference_count - before.inference_count == requests
        assert after.inference_stats.success.count - before.inference_stats.success.count == requests
        assert after.execution_count - before.execution_count < requests
        sizes = [batch.batch_size for batch in after.batch_stats]
        assert max(sizes) > 1, sizes
        assert max(sizes) <= 64  # max_batch_size


# The blocker keeps ragged's one instance busy this long, so the mixed-length requests sent with it queue
# behind it and meet in one batch; the batch statistics confirm they did (else another round).
RAGGED_BLOCK_MS = 300


def test_a_variable_length_neighbour_fails_no_request(stub, serving):
    """dims [-1]: four requests of length 4 and one of 5 batched together used to fail with INTERNAL."""
    before = model_stats(stub, "ragged")
    requests = 0
    for _ in range(MAX_ROUNDS):
        arrays = [np.full((1, length), index + 1, np.float32) for index, length in enumerate([4, 4, 5, 4, 4])]
        blocker = infer_request("ragged", {"X": np.full((1, 1), -RAGGED_BLOCK_MS, np.float32)})
        results = infer_concurrently(serving.address,
                                     [blocker, *[infer_request("ragged", {"X": array}) for array in arrays]])
        requests += len(results)
        for array, result in zip([None, *arrays], results, strict=True):
            assert not isinstance(result, grpc.RpcError), f"{result.code()}: {result.details()}"
            if array is not None:
                np.testing.assert_array_equal(decode_outputs(result)["Y"], array * 2)
        after = model_stats(stub, "ragged")
        if any(batch.batch_size > 1 for batch in after.batch_stats):
            break
    assert after.inference_stats.success.count - before.inference_stats.success.count == requests
    assert after.inference_stats.fail.count == before.inference_stats.fail.count
    assert max(batch.batch_size for batch in after.batch_stats) > 1


def test_without_dynamic_batching_every_batch_is_one_request(serving, stub):
    before = model_stats(stub, "doubler")
    sizes = [1 + i % 4 for i in range(24)]
    arrays = [np.arange(4 * size, dtype=np.float32).reshape(size, 4) + i for i, size in enumerate(sizes)]
    results = infer_concurrently(serving.address, [infer_request("doubler", {"X": x}) for x in arrays])
    for x, result in zip(arrays, results, strict=True):
        assert not isinstance(result, grpc.RpcError), result
        np.testing.assert_array_equal(decode_outputs(result)["Y"], 2 * x)
    after = model_stats(stub, "doubler")
    assert after.execution_count - before.execution_count == len(sizes)
    assert after.inference_count - before.inference_count == sum(sizes)
    # One execution per request, of exactly that request's batch size.
    def executions(stats) -> collections.Counter:
        return collections.Counter({batch.batch_size: batch.compute_infer.count for batch in stats.batch_stats})

    assert executions(after) - executions(before) == collections.Counter(sizes)


def test_full_queue_answers_resource_exhausted(serving, stub):
    # One request runs, two may wait (max_queue_size 2): the rest of a flood is refused.
    flood = 10
    results = infer_concurrently(serving.address, [_delay("slow", 300) for _ in range(flood)])
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    served = [r for r in results if not isinstance(r, grpc.RpcError)]
    assert refused and served
    for error in refused:
        assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "slow", "queue", "full")
    for response in served:
        assert decode_outputs(response)["DONE_MS"].tolist() == [[300]]
    # The queue frees up again: a later request is served.
    response = stub.ModelInfer(_delay("slow", 0), timeout=RPC_TIMEOUT_S)
    assert decode_outputs(response)["DONE_MS"].tolist() == [[0]]


def test_queued_request_past_its_timeout_is_deadline_exceeded(stub):
    started = model_stats(stub, "slow").inference_stats.queue.count
    blocker = stub.ModelInfer.future(_delay("slow", 500), timeout=RPC_TIMEOUT_S)
    try:
        wait_executing(stub, "slow", started)
        # 1 ms in the queue (the parameter is in microseconds) behind a 500 ms execution.
        error = rpc_error(stub.ModelInfer, _delay("slow", 0, request_id="late",
                                                  parameters={"timeout": int_param(1000)}))
        assert_status(error, grpc.StatusCode.DEADLINE_EXCEEDED, "'late'", "slow")
    finally:
        assert decode_outputs(blocker.result(timeout=RPC_TIMEOUT_S))["DONE_MS"].tolist() == [[500]]


def test_timeout_parameter_is_honoured_only_while_queued(stub):
    # A generous timeout on an idle model: the request runs at once and succeeds,
    # even though the execution itself takes longer than nothing.
    response = stub.ModelInfer(_delay("slow", 20, parameters={"timeout": int_param(10_000_000)}),
                               timeout=RPC_TIMEOUT_S)
    assert decode_outputs(response)["DONE_MS"].tolist() == [[20]]


def test_two_instances_execute_concurrently(serving, stub):
    # Each execution of 'pair' waits for a second one at a Barrier(2): both succeed only
    # if instance_group count 2 really runs them at the same time.
    requests = [infer_request("pair", {"X": np.array([i], np.int32)}) for i in (7, 8)]
    results = infer_concurrently(serving.address, requests)
    for value, result in zip((7, 8), results, strict=True):
        assert not isinstance(result, grpc.RpcError), result
        assert decode_outputs(result)["Y"].tolist() == [value]
    stats = model_stats(stub, "pair")
    assert stats.execution_count == 2 and stats.inference_stats.fail.count == 0


def test_failing_predictor_fails_only_its_own_batch(serving, stub):
    before = model_stats(stub, "fragile")
    arrays = [np.full((1, 4), i, np.float32) for i in range(8)]
    arrays[3] = np.array([[1, -2.5, 3, 4]], np.float32)
    results = infer_concurrently(serving.address, [infer_request("fragile", {"X": x}) for x in arrays])
    for index, (x, result) in enumerate(zip(arrays, results, strict=True)):
        if index == 3:
            assert_status(result, grpc.StatusCode.INTERNAL, "fragile", "ValueError",
                          "fragile refuses negative input -2.5")
        else:
            assert not isinstance(result, grpc.RpcError), result
            np.testing.assert_array_equal(decode_outputs(result)["Y"], 2 * x)
    after = model_stats(stub, "fragile")
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert after.inference_stats.success.count - before.inference_stats.success.count == 7
    # The replica keeps serving that model and the others.
    response = stub.ModelInfer(infer_request("fragile", {"X": np.ones((2, 4), np.float32)}),
                               timeout=RPC_TIMEOUT_S)
    np.testing.assert_array_equal(decode_outputs(response)["Y"], np.full((2, 4), 2, np.float32))



def test_a_predictors_exception_is_logged_with_its_traceback(serving, stub):
    """The replica's log (what the agent keeps and `ctl logs` shows) has the predictor's frame, not only
    the message the client got."""
    [result] = infer_concurrently(serving.address, [infer_request("fragile", {"X": np.full((1, 4), -7, np.float32)})])
    assert_status(result, grpc.StatusCode.INTERNAL, "fragile", "ValueError", "fragile refuses negative input -7.0")
    frame = 'raise ValueError(f"fragile refuses negative input {float(x[x < 0][0])}")'
    last_line = "ValueError: fragile refuses negative input -7.0"
    # Wait for this call's own last line: the module's replica is shared, and an earlier test's failure
    # (-2.5) has already put the same frame into the output.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(last_line in line for line in serving.output):
        time.sleep(0.05)   # the output is read by a thread
    text = "".join(serving.output)
    assert last_line in text, text[-3000:]
    this_call = text[:text.index(last_line)]
    this_traceback = this_call[this_call.rindex("Traceback (most recent call last):"):]
    assert frame in this_traceback, text[-3000:]


def test_statistics_durations_are_nanoseconds(stub):
    delay_ms = 50
    before = model_stats(stub, "sleeper")
    started = time.perf_counter_ns()
    stub.ModelInfer(_delay("sleeper", delay_ms), timeout=RPC_TIMEOUT_S)
    elapsed_ns = time.perf_counter_ns() - started
    after = model_stats(stub, "sleeper")

    def grown(field: str) -> int:
        return getattr(after.inference_stats, field).ns - getattr(before.inference_stats, field).ns

    # The predictor sleeps at least delay_ms; server-side time fits in the client's round trip.
    assert delay_ms * 1_000_000 <= grown("compute_infer") <= grown("success") <= elapsed_ns
    assert 0 <= grown("queue") <= elapsed_ns
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1
    assert [b.batch_size for b in after.batch_stats] == [1]  # no batch axis: one item per execution


def test_abandoned_requests_do_not_hold_queue_slots(stub):
    started = model_stats(stub, "slow").inference_stats.queue.count
    blocker = stub.ModelInfer.future(_delay("slow", 1500), timeout=RPC_TIMEOUT_S)
    try:
        wait_executing(stub, "slow", started)
        abandoned = [stub.ModelInfer.future(_delay("slow", 0), timeout=0.2) for _ in range(2)]
        for call in abandoned:
            with pytest.raises(grpc.RpcError) as info:
                call.result()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Both queue slots are free again: this request waits for the blocker, then runs.
        response = stub.ModelInfer(_delay("slow", 0, request_id="after"), timeout=RPC_TIMEOUT_S)
        assert response.id == "after"
    finally:
        blocker.result(timeout=RPC_TIMEOUT_S)
