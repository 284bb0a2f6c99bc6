"""Unit tests of the batcher against fake instances: no gRPC, no sleeping on timers we do not control."""

from __future__ import annotations

import asyncio
import gc
import weakref

import numpy as np
import pytest

from meshserve.common.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    drop_tracebacks,
)
from meshserve.runtime.batcher import Batcher, BatchingPolicy
from meshserve.runtime.instance_pool import InstancePool
from meshserve.runtime.request import InferRequest
from meshserve.runtime.statistics import ModelStatisticsRecorder


class GatedInstance:
    """Doubles its input; each execution waits for the test to open the gate."""

    def __init__(self, fail_on: float | None = None):
        self.batches: list[int] = []
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.fail_on = fail_on

    async def execute(self, inputs):
        x = inputs["X"]
        self.batches.append(x.shape[0])
        self.started.set()
        await self.gate.wait()
        if self.fail_on is not None and (x == self.fail_on).any():
            raise ValueError("poisoned value")
        return {"Y": x * 2}


def request(value: float, rows: int = 1, deadline: float | None = None) -> InferRequest:
    return InferRequest(id=str(value), inputs={"X": np.full((rows, 2), value, np.float32)},
                        batch_size=rows, requested_outputs=None, parameters={}, deadline=deadline)


def policy(**overrides) -> BatchingPolicy:
    values = dict(enabled=True, max_batch_size=8, preferred_size=8, max_queue_delay_s=0.0, max_queue_size=0)
    values.update(overrides)
    return BatchingPolicy(**values)


async def _occupy(batcher: Batcher, instance: GatedInstance) -> asyncio.Future:
    """Submit one request and wait until the only instance is busy with it."""
    first = batcher.submit(request(-1))
    await instance.started.wait()
    return first


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_requests_queued_while_busy_form_one_batch_with_their_own_results():
    async def body():
        instance = GatedInstance()
        stats = ModelStatisticsRecorder("m", "1")
        batcher = Batcher("m", InstancePool([instance]), policy(), stats)
        first = await _occupy(batcher, instance)
        queued = [batcher.submit(request(v)) for v in (1, 2, 3)]
        instance.gate.set()
        results = await asyncio.gather(first, *queued)
        assert instance.batches == [1, 3]
        for value, result in zip((-1, 1, 2, 3), results, strict=True):
            np.testing.assert_array_equal(result["Y"], np.full((1, 2), value * 2, np.float32))
        proto = stats.to_proto()
        assert (proto.inference_count, proto.execution_count) == (4, 2)
        assert sorted(b.batch_size for b in proto.batch_stats) == [1, 3]
        await batcher.close()
    run(body())


def test_a_batch_never_exceeds_max_batch_size():
    async def body():
        instance = GatedInstance()
        batcher = Batcher("m", InstancePool([instance]), policy(max_batch_size=4, preferred_size=4),
                          ModelStatisticsRecorder("m", "1"))
        first = await _occupy(batcher, instance)
        queued = [batcher.submit(request(v, rows=3)) for v in range(3)]
        instance.gate.set()
        await asyncio.gather(first, *queued)
        assert instance.batches == [1, 3, 3, 3]
        await batcher.close()
    run(body())


def test_batching_off_runs_every_request_alone():
    async def body():
        instance = GatedInstance()
        batcher = Batcher("m", InstancePool([instance]), policy(enabled=False, preferred_size=1),
                          ModelStatisticsRecorder("m", "1"))
        first = await _occupy(batcher, instance)
        queued = [batcher.submit(request(v, rows=2)) for v in range(3)]
        instance.gate.set()
        await asyncio.gather(first, *queued)
        assert instance.batches == [1, 2, 2, 2]
        await batcher.close()
    run(body())


def test_an_exception_fails_only_its_own_batch():
    async def body():
        instance = GatedInstance(fail_on=13.0)
        batcher = Batcher("m", InstancePool([instance]), policy(max_batch_size=2, preferred_size=2),
                          ModelStatisticsRecorder("m", "1"))
        first = await _occupy(batcher, instance)
        poisoned = [batcher.submit(request(13)), batcher.submit(request(1))]
        healthy = [batcher.submit(request(2)), batcher.submit(request(3))]
        instance.gate.set()
        await first
        for future in poisoned:
            with pytest.raises(Internal, match="ValueError: poisoned value"):
                await future
        assert [float(f["Y"][0, 0]) for f in await asyncio.gather(*healthy)] == [4.0, 6.0]
        await batcher.close()
    run(body())


def test_a_full_queue_refuses_with_resource_exhausted():
    async def body():
        instance = GatedInstance()
        batcher = Batcher("m", InstancePool([instance]), policy(max_queue_size=2),
                          ModelStatisticsRecorder("m", "1"))
        first = await _occupy(batcher, instance)
        queued = [batcher.submit(request(1)), batcher.submit(request(2))]
        with pytest.raises(ResourceExhausted, match="queue of model 'm' is full"):
            batcher.submit(request(3))
        instance.gate.set()
        await asyncio.gather(first, *queued)
        await batcher.close()
    run(body())


def test_a_request_past_its_queue_deadline_fails_without_running():
    async def body():
        instance = GatedInstance()
        batcher = Batcher("m", InstancePool([instance]), policy(), ModelStatisticsRecorder("m", "1"))
        first = await _occupy(batcher, instance)
        expired = batcher.submit(request(5, deadline=0.0))  # monotonic time 0 is long past
        instance.gate.set()
        await first
        with pytest.raises(DeadlineExceeded, match="timed out in the queue"):
            await expired
        assert instance.batches == [1]
        await batcher.close()
    run(body())


def test_requests_with_different_input_sets_are_not_mixed():
    async def body():
        instance = GatedInstance()
        batcher = Batcher("m", InstancePool([instance]), policy(), ModelStatisticsRecorder("m", "1"))
        first = await _occupy(batcher, instance)
        plain = batcher.submit(request(1))
        extra = request(2)
        extra.inputs["OPTIONAL"] = np.zeros((1, 1), np.float32)
        with_optional = batcher.submit(extra)
        instance.gate.set()
        await asyncio.gather(first, plain, with_optional)
        assert instance.batches == [1, 1, 1]
        await batcher.close()
    run(body())


def test_a_request_of_another_length_waits_for_its_own_batch_and_fails_nobody():
    """dims [-1]: four requests of length 4 and one of 5 queued together used to fail all five with INTERNAL."""
    async def body():
        instance = GatedInstance()
        batcher = Batcher("m", InstancePool([instance]), policy(), ModelStatisticsRecorder("m", "1"))
        first = await _occupy(batcher, instance)
        lengths = [4, 4, 5, 4, 4]
        arrays = [np.full((1, length), index, np.float32) for index, length in enumerate(lengths)]
        futures = [batcher.submit(InferRequest(id=str(index), inputs={"X": array}, batch_size=1,
                                               requested_outputs=None, parameters={}))
                   for index, array in enumerate(arrays)]
        instance.gate.set()
        await first
        results = await asyncio.gather(*futures)
        for array, result in zip(arrays, results, strict=True):
            np.testing.assert_array_equal(result["Y"], array * 2)
        assert instance.batches == [1, 4, 1]  # the four of length 4 together, then the odd one
        await batcher.close()
    run(body())


def test_skipping_a_request_that_does_not_fit_keeps_it_at_the_head():
    async def body():
        instance = GatedInstance()
        batcher = Batcher("m", InstancePool([instance]), policy(max_batch_size=4, preferred_size=4),
                          ModelStatisticsRecorder("m", "1"))
        first = await _occupy(batcher, instance)
        futures = [batcher.submit(request(value, rows)) for value, rows in ((1, 2), (2, 3), (3, 2), (4, 1))]
        instance.gate.set()
        await asyncio.gather(first, *futures)
        # 2 + 2 fill a batch past the 3 that does not fit; the 3 then heads the next one (with the 1).
        assert instance.batches == [1, 4, 4]
        await batcher.close()
    run(body())


def test_close_finishes_queued_work_then_refuses_new_requests():
    async def body():
        instance = GatedInstance()
        batcher = Batcher("m", InstancePool([instance]), policy(), ModelStatisticsRecorder("m", "1"))
        first = await _occupy(batcher, instance)
        queued = batcher.submit(request(1))
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0)  # let close() start waiting
        with pytest.raises(Unavailable, match="unloading"):
            batcher.submit(request(2))
        instance.gate.set()
        await closing
        assert first.done() and queued.done() and float(queued.result()["Y"][0, 0]) == 2.0
    run(body())


class FakeClock:
    def __init__(self, now: float = 1_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _turns(count: int = 50) -> None:
    """Let the event loop run a bounded number of turns (no wall-clock time involved)."""
    for _ in range(count):
        await asyncio.sleep(0)


def test_a_lone_client_does_not_wait_for_company():
    """Arrivals further apart than the delay: each request is dispatched at once."""
    async def body():
        clock = FakeClock()
        instance = GatedInstance()
        instance.gate.set()
        batcher = Batcher("m", InstancePool([instance]), policy(max_queue_delay_s=60.0),
                          ModelStatisticsRecorder("m", "1"), clock=clock)
        for value in range(3):
            clock.now += 120.0  # two delays since the last arrival
            future = batcher.submit(request(value))
            await _turns()
            assert future.done(), "the batcher held a lone request back for company"
            assert float(future.result()["Y"][0, 0]) == value * 2
        await batcher.close()
    run(body())


def test_frequent_arrivals_wait_for_company_up_to_the_preferred_size():
    async def body():
        clock = FakeClock()
        instance = GatedInstance()
        batcher = Batcher("m", InstancePool([instance]), policy(max_queue_delay_s=60.0, preferred_size=3),
                          ModelStatisticsRecorder("m", "1"), clock=clock)
        first = await _occupy(batcher, instance)
        history = []
        for _ in range(6):  # arrivals far more often than the delay, while the instance is busy
            clock.now += 0.001
            history.append(batcher.submit(request(1)))
        instance.gate.set()
        await asyncio.gather(first, *history)
        assert instance.batches == [1, 3, 3]

        clock.now += 0.001
        waiting = batcher.submit(request(2))
        await _turns()
        assert not waiting.done(), "with frequent arrivals a request should wait for company"
        clock.now += 0.001
        company = [batcher.submit(request(3)), batcher.submit(request(4))]
        await asyncio.gather(waiting, *company)
        assert instance.batches == [1, 3, 3, 3]
        await batcher.close()
    run(body())


class RefusingInstance:
    """Refuses every batch with a taxonomy error, as a model's own validation would."""

    async def execute(self, inputs):
        raise InvalidArgument("refused by the model")


def test_a_refused_batch_leaves_no_reference_cycle_holding_its_requests():
    """A failed batch's error must not keep its requests' tensors alive until a garbage collection
    (issue 8 item 5: refused requests held their memory through exception frames)."""
    async def body():
        batcher = Batcher("m", InstancePool([RefusingInstance()]), policy(),
                          ModelStatisticsRecorder("m", "1"))
        doomed = request(1.0)
        tensor = weakref.ref(doomed.inputs["X"])
        future = batcher.submit(doomed)
        del doomed
        with pytest.raises(InvalidArgument) as refused:
            await future
        drop_tracebacks(refused.value)   # what the status interceptor does with the caller's own frames
        del future, refused
        await asyncio.sleep(0)           # let the batch task finish
        await batcher.close()
        return tensor

    gc.disable()
    try:
        tensor = run(body())
        assert tensor() is None, "the refused request's tensor is still alive without a collection"
    finally:
        gc.enable()
