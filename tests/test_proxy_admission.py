"""Admission control at the proxy (issue 8, item 10).

30 channels x 100 concurrent calls through the proxy lost 696 of 3,000 as a
bare CANCELLED: grpc core sheds calls beyond its pending-request queue. The
storm below runs against a REAL runtime behind the proxy; the admission
rules themselves are unit-tested on ``Admission`` with small limits.
"""

from __future__ import annotations

import asyncio
import collections

import grpc
import pytest
from conftest import EXAMPLES, RuntimeProcess
from test_proxy_helpers import LoopThread, ProxyRig, route
from test_runtime_helpers import add_sub_inputs, infer_request

from meshserve.common.errors import DeadlineExceeded, ResourceExhausted
from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc
from meshserve.proxy.admission import Admission

STORM_CHANNELS = 30
STORM_CALLS_PER_CHANNEL = 100
# Bounds a stuck storm; 3,000 add_sub calls take a few seconds.
STORM_DEADLINE_S = 60.0


async def _storm(address: str) -> tuple[collections.Counter, collections.Counter]:
    """Every call of the storm at once; (calls by status, failure messages)."""
    request = infer_request("add_sub", add_sub_inputs())
    channels = [grpc.aio.insecure_channel(address) for _ in range(STORM_CHANNELS)]
    codes: collections.Counter = collections.Counter()
    messages: collections.Counter = collections.Counter()

    async def call(stub):
        try:
            await stub.ModelInfer(request, timeout=STORM_DEADLINE_S)
            codes["OK"] += 1
        except grpc.aio.AioRpcError as err:
            codes[err.code().name] += 1
            messages[(err.code().name, err.details())] += 1
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in channels]
        await asyncio.gather(*(call(stub) for stub in stubs for _ in range(STORM_CALLS_PER_CHANNEL)))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return codes, messages


def test_a_storm_of_3000_concurrent_calls_loses_none_to_cancelled():
    replica = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(EXAMPLES), "--model", "add_sub"])
    loop = LoopThread()
    rig = ProxyRig(loop, route("add_sub", ("r0", replica.address)))
    try:
        codes, messages = asyncio.run(_storm(rig.address))
    finally:
        rig.close()
        loop.close()
        replica.stop()
    print(f"{STORM_CHANNELS} channels x {STORM_CALLS_PER_CHANNEL} calls through the proxy:", dict(codes))
    assert sum(codes.values()) == STORM_CHANNELS * STORM_CALLS_PER_CHANNEL
    assert codes["CANCELLED"] == 0, messages.most_common(3)
    failures = {key: n for key, n in messages.items() if key[0] != "RESOURCE_EXHAUSTED" or not key[1]}
    assert failures == {}, "every failure, if any, must be RESOURCE_EXHAUSTED with a message"


def test_a_pool_of_channels_per_replica_spreads_calls_over_its_connections():
    replica = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(EXAMPLES), "--model", "add_sub"])
    loop = LoopThread()
    rig = ProxyRig(loop, route("add_sub", ("r0", replica.address)), channels_per_replica=3)
    try:
        request = infer_request("add_sub", add_sub_inputs())
        with grpc.insecure_channel(rig.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(6):
                stub.ModelInfer(request, timeout=STORM_DEADLINE_S)
        (endpoint,) = loop.call(rig.proxy.pool.all)
        states = [loop.call(c.get_state) for c in endpoint.channels]
        assert states == [grpc.ChannelConnectivity.READY] * 3
    finally:
        rig.close()
        loop.close()
        replica.stop()


# -- the rules, on Admission alone ---------------------------------------------------------------


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_calls_beyond_the_limit_wait_in_order_and_get_the_slots_as_they_free():
    async def scenario():
        admission = Admission(limit=1, max_queued=5, max_queued_bytes=1000)
        await admission.acquire(None, 1, "r")
        order = []

        async def waiter(name):
            await admission.acquire(None, 1, "r")
            order.append(name)
        tasks = [asyncio.create_task(waiter(n)) for n in "abc"]
        await asyncio.sleep(0)
        assert (admission.running, admission.queued) == (1, 3)
        for _ in range(3):
            admission.release()
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert order == ["a", "b", "c"] and (admission.running, admission.queued) == (1, 0)
        admission.release()
        assert admission.running == 0
    _run(scenario())


def test_a_full_queue_is_resource_exhausted_naming_the_replica_and_its_load():
    async def scenario():
        admission = Admission(limit=1, max_queued=1, max_queued_bytes=1000)
        await admission.acquire(None, 1, "replica r0")
        queued = asyncio.create_task(admission.acquire(None, 1, "replica r0"))
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="replica r0 is at capacity: 1 calls running, 1 waiting"):
            await admission.acquire(None, 1, "replica r0")
        queued.cancel()
    _run(scenario())


def test_queued_bytes_are_bounded_but_one_request_may_always_wait():
    async def scenario():
        admission = Admission(limit=1, max_queued=10, max_queued_bytes=100)
        await admission.acquire(None, 1, "r")
        big = asyncio.create_task(admission.acquire(None, 500, "r"))   # alone in the queue: may wait
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted):
            await admission.acquire(None, 1, "r")
        admission.release()
        await big
        assert admission.queued_bytes == 0
    _run(scenario())


def test_a_wait_ends_at_the_deadline_and_a_cancelled_waiter_leaves_the_queue():
    async def scenario():
        admission = Admission(limit=1, max_queued=5, max_queued_bytes=1000)
        await admission.acquire(None, 1, "replica r0")
        with pytest.raises(DeadlineExceeded, match="waiting for replica r0"):
            await admission.acquire(0.01, 1, "replica r0")
        cancelled = asyncio.create_task(admission.acquire(None, 1, "replica r0"))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert (admission.queued, admission.queued_bytes) == (0, 0)
        admission.release()
        assert admission.running == 0
    _run(scenario())
