"""The proxy's forwarding rules against FAKE replicas (in-test grpc.aio servers on port 0):
deadline and metadata pass-through, trace context, which failures are retried, leader following.

A fake replica answers ModelInfer with raw bytes and records what it received,
so each rule is observed at the replica, exactly.
"""

from __future__ import annotations

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from test_proxy_helpers import RPC_TIMEOUT_S, FakeRoutes, ProxyRig, route

from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc


class FakeReplica:
    """ModelInfer answers ``fail_with`` (a status) the first ``failures`` times, then a response naming itself."""

    def __init__(self, name: str, fail_with: grpc.StatusCode | None = None, failures: int = 10**9):
        self.name = name
        self.fail_with = fail_with
        self.failures = failures
        self.calls: list[dict] = []

    async def start(self) -> None:
        self.server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self.infer),
        })
        self.server.add_generic_rpc_handlers((handler,))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()

    async def infer(self, request: bytes, context):
        self.calls.append({"request": request, "metadata": dict(context.invocation_metadata()),
                           "remaining": context.time_remaining()})
        if self.fail_with is not None and len(self.calls) <= self.failures:
            await context.abort(self.fail_with, f"{self.name} says {self.fail_with.name}")
        return pb.ModelInferResponse(model_name="m", id=self.name).SerializeToString()


def _replicas(loop, *replicas: FakeReplica) -> list[FakeReplica]:
    for replica in replicas:
        loop.run(replica.start())
    return list(replicas)


def _stub(rig):
    channel = grpc.insecure_channel(rig.address)
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def test_request_bytes_deadline_and_metadata_reach_the_replica_unchanged(loop):
    (replica,) = _replicas(loop, FakeReplica("a"))
    rig = ProxyRig(loop, route("m", ("a", replica.address)))
    channel, stub = _stub(rig)
    try:
        request = pb.ModelInferRequest(model_name="m", id="req", raw_input_contents=[b"\x01\x02" * 1000])
        response = stub.ModelInfer(request, timeout=7.0, metadata=[("x-tenant", "blue"), ("x-blob-bin", b"\x00\xff")])
    finally:
        channel.close()
        rig.close()
    assert response.id == "a"
    call = replica.calls[0]
    assert call["request"] == request.SerializeToString()
    assert call["metadata"]["x-tenant"] == "blue" and call["metadata"]["x-blob-bin"] == b"\x00\xff"
    assert 5.0 < call["remaining"] < 7.5   # the client's remaining deadline (coarsely encoded), not a default


def test_unavailable_is_retried_on_another_replica_and_the_failed_one_leaves_rotation(loop):
    bad, good = _replicas(loop, FakeReplica("bad", grpc.StatusCode.UNAVAILABLE), FakeReplica("good"))
    rig = ProxyRig(loop, route("m", ("bad", bad.address), ("good", good.address)))
    channel, stub = _stub(rig)
    try:
        answers = [stub.ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=RPC_TIMEOUT_S).id
                   for _ in range(20)]
        retries = loop.call(lambda: rig.proxy.metrics.retries.labels("m", "UNAVAILABLE").value)
        bad_in_rotation = loop.call(lambda: rig.proxy.pool.get(bad.address).healthy)
    finally:
        channel.close()
        rig.close()
    assert answers == ["good"] * 20
    # Out of rotation after its first failure (a fake replica has no health service to bring it back).
    assert len(bad.calls) == 1 and retries == 1 and not bad_in_rotation


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT])
def test_a_call_that_may_have_run_is_never_retried(loop, code):
    replicas = _replicas(loop, FakeReplica("a", code), FakeReplica("b", code))
    rig = ProxyRig(loop, route("m", *[(r.name, r.address) for r in replicas]))
    channel, stub = _stub(rig)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=RPC_TIMEOUT_S)
    finally:
        channel.close()
        rig.close()
    assert info.value.code() == code and "says" in info.value.details()
    assert sum(len(r.calls) for r in replicas) == 1


def test_retries_per_call_are_bounded(loop):
    replicas = _replicas(loop, *[FakeReplica(f"u{i}", grpc.StatusCode.UNAVAILABLE) for i in range(5)])
    rig = ProxyRig(loop, route("m", *[(r.name, r.address) for r in replicas]))
    channel, stub = _stub(rig)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=RPC_TIMEOUT_S)
    finally:
        channel.close()
        rig.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert sum(len(r.calls) for r in replicas) == 3   # the first try and 2 retries


def test_one_server_span_per_call_whose_context_the_replica_receives(loop):
    (replica,) = _replicas(loop, FakeReplica("a", grpc.StatusCode.UNAVAILABLE, failures=0))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    rig = ProxyRig(loop, route("m", ("a", replica.address), node="gpu-7"), tracer_provider=provider)
    client_span = provider.get_tracer("test").start_span("client")
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(client_span))
    channel, stub = _stub(rig)
    try:
        stub.ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=RPC_TIMEOUT_S,
                        metadata=list(carrier.items()))
    finally:
        channel.close()
        rig.close()
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "proxy ModelInfer"]
    assert span.kind == trace.SpanKind.SERVER
    assert span.parent.span_id == client_span.get_span_context().span_id
    assert span.attributes["meshserve.model"] == "m"
    assert span.attributes["meshserve.replica"] == "a" and span.attributes["meshserve.node"] == "gpu-7"
    traceparent = replica.calls[0]["metadata"]["traceparent"]
    assert traceparent.split("-")[2] == format(span.context.span_id, "016x")   # the replica's parent is the proxy span


def test_retries_are_span_events(loop):
    bad, good = _replicas(loop, FakeReplica("bad", grpc.StatusCode.UNAVAILABLE), FakeReplica("good"))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    rig = ProxyRig(loop, route("m", ("bad", bad.address), ("good", good.address)), tracer_provider=provider)
    channel, stub = _stub(rig)
    try:
        for _ in range(10):
            stub.ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=RPC_TIMEOUT_S)
    finally:
        channel.close()
        rig.close()
    events = [e for s in exporter.get_finished_spans() for e in s.events if e.name == "retry"]
    assert len(events) == 1 and events[0].attributes["meshserve.replica"] == "bad"


def test_a_standby_scheduler_is_left_for_the_leader_it_names(loop):
    (replica,) = _replicas(loop, FakeReplica("a"))
    leader = FakeRoutes()
    loop.run(leader.start())
    loop.run(leader.publish(route("m", ("a", replica.address))))
    standby = FakeRoutes(refuse_with=f"scheduler s1 is not the leader; the leader is s2 at {leader.address}")
    loop.run(standby.start())
    from meshserve.proxy import ProxyOptions, ProxyServer

    async def start():
        proxy = ProxyServer(ProxyOptions(schedulers=[standby.address], listen="127.0.0.1:0"))
        await proxy.start()
        await proxy.wait_for_routes(RPC_TIMEOUT_S)
        return proxy
    proxy = loop.run(start())
    try:
        assert standby.watch_calls >= 1 and proxy.follower.connected_to == leader.address
        with grpc.insecure_channel(proxy.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=RPC_TIMEOUT_S).id == "a"
    finally:
        loop.run(proxy.stop(0))
        loop.run(leader.stop())
        loop.run(standby.stop())


def test_a_new_table_takes_effect_for_the_next_call(loop):
    first, second = _replicas(loop, FakeReplica("first"), FakeReplica("second"))
    rig = ProxyRig(loop, route("m", ("first", first.address)))
    channel, stub = _stub(rig)
    try:
        assert stub.ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=RPC_TIMEOUT_S).id == "first"
        rig.publish(route("m", ("second", second.address)))
        assert stub.ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=RPC_TIMEOUT_S).id == "second"
        rig.publish()
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=RPC_TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        channel.close()
        rig.close()


def test_no_route_table_yet_means_not_ready_and_unavailable(loop):
    from meshserve.proxy import ProxyOptions, ProxyServer

    async def start():
        proxy = ProxyServer(ProxyOptions(schedulers=["127.0.0.1:1"], listen="127.0.0.1:0"))
        await proxy.start()
        return proxy
    proxy = loop.run(start())
    try:
        with grpc.insecure_channel(proxy.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=RPC_TIMEOUT_S).ready
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=RPC_TIMEOUT_S)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        loop.run(proxy.stop(0))


