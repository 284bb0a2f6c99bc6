"""What a drain waits for: a call counts until its RPC is over, not until its handler returns.

The race this closes: a unary handler returns its response, the count dropped to 0, the drain saw
"idle" and stopped the server at once, and the response still on its way was cancelled ("Cancelling
all calls"). It showed under load in tests/test_runtime_lifecycle.py.
"""

from __future__ import annotations

import asyncio

import pytest

from meshserve.runtime.in_flight import InFlight


class Context:
    """The part of grpc.aio.ServicerContext the count uses: done callbacks, run when the RPC is over."""

    def __init__(self) -> None:
        self.callbacks: list = []

    def add_done_callback(self, callback) -> None:
        self.callbacks.append(callback)

    def finish(self) -> None:
        for callback in self.callbacks:
            callback(self)


def test_a_call_counts_until_its_rpc_is_over():
    async def scenario():
        in_flight, context = InFlight(), Context()
        with in_flight.call(context):
            assert in_flight.count == 1
        assert in_flight.count == 1                        # the handler returned; the response is not out yet
        assert not await in_flight.wait_idle(0.05)
        context.finish()
        assert in_flight.count == 0
        assert await in_flight.wait_idle(0.05)
    asyncio.run(scenario())


def test_a_handler_that_raises_or_a_context_without_callbacks_stops_counting_at_once():
    in_flight = InFlight()
    with pytest.raises(ValueError), in_flight.call(Context()):
        raise ValueError("boom")
    assert in_flight.count == 0
    with in_flight.call(object()):
        pass
    assert in_flight.count == 0
