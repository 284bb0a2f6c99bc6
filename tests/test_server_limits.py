"""One client cannot take a server's streams: past the per-connection limit its calls wait, others go on.

A real proxy (in-process, port 0) with a limit of 4 streams per connection,
to keep the test small; the default (protos/limits.py) is the same setting.
"""

from __future__ import annotations

import queue

import grpc
import pytest
from test_proxy_helpers import LoopThread, ProxyRig, route

from meshserve.common import limits
from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc
from meshserve.scheduler.server import SERVER_OPTIONS

STREAMS = 4
# A call held behind the limit waits; this is how long the test lets it wait before concluding so.
HELD_S = 1.0
RPC_TIMEOUT_S = 10.0


def own_connection(address: str) -> grpc.Channel:
    channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT_S)
    return channel


def _idle_requests(stop: queue.Queue):
    """A request stream that sends nothing until told to end: the stream stays open."""
    stop.get()
    return
    yield


@pytest.fixture
def proxy():
    loop = LoopThread()
    rig = ProxyRig(loop, route("add_sub", ("r0", "127.0.0.1:9")), max_streams_per_connection=STREAMS)
    yield rig
    rig.close()
    loop.close()


def test_streams_past_the_limit_on_one_connection_wait_and_other_connections_are_served(proxy):
    greedy = own_connection(proxy.address)
    stub = pb_grpc.GRPCInferenceServiceStub(greedy)
    stops = [queue.Queue() for _ in range(STREAMS)]
    streams = [stub.ModelStreamInfer(_idle_requests(stop), timeout=60) for stop in stops]
    try:
        with pytest.raises(grpc.RpcError) as held:
            stub.ServerLive(pb.ServerLiveRequest(), timeout=HELD_S)
        assert held.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        other = own_connection(proxy.address)
        try:
            assert pb_grpc.GRPCInferenceServiceStub(other).ServerLive(
                pb.ServerLiveRequest(), timeout=RPC_TIMEOUT_S).live
        finally:
            other.close()

        stops[0].put(None)                      # one stream ends: the connection has room again
        assert list(streams[0]) == []
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=RPC_TIMEOUT_S).live
    finally:
        for stop in stops:
            stop.put(None)
        for stream in streams:
            stream.cancel()
        greedy.close()


def test_the_scheduler_bounds_streams_and_strikes_ping_floods():
    options = dict(SERVER_OPTIONS)
    assert options["grpc.max_concurrent_streams"] == limits.CONTROL_PLANE_MAX_STREAMS_PER_CONNECTION
    assert options["grpc.http2.max_ping_strikes"] == limits.MAX_PING_STRIKES > 0
    # Agents ping every KEEPALIVE_TIME_MS: they must stay within what the scheduler allows.
    from meshserve.node_agent.agent import KEEPALIVE_TIME_MS
    assert options["grpc.http2.min_ping_interval_without_data_ms"] < KEEPALIVE_TIME_MS
