"""Integration: traces from the client library through a real runtime to a real OTLP/gRPC receiver.

A runtime subprocess exports its spans over OTLP to ``OtlpReceiver`` (the
standard OTEL_* environment). The traced application is a subprocess too
(``_CLIENT_APP``): it installs its own SDK provider exporting to the same
receiver, which would otherwise stay installed for every later test of this
pytest process. Waits poll the receiver with a deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import EXAMPLES, REPO_ROOT
from otlp_receiver import OtlpReceiver, ReceivedSpan

# A replica loads and an application exports within a few seconds on a loaded
# 2-core machine; these bound a broken run, they are not performance claims.
SPAN_TIMEOUT_S = 30.0
CLIENT_TIMEOUT_S = 60.0
CLIENT_SERVICE = "tracing-test-client"
RUNTIME_SERVICE = "meshserve-runtime"

_CLIENT_APP = r"""
import asyncio, json, sys
import numpy as np
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from meshserve.clients import AsyncInferenceClient, InferenceClient, InvalidArgument, NotFound

args = json.loads(sys.argv[1])
if args["sdk"]:
    provider = TracerProvider(resource=Resource.create({"service.name": args["service"]}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=args["receiver"], insecure=True)))
    trace.set_tracer_provider(provider)
tracer = trace.get_tracer("test-app")
ones = {"INPUT0": np.ones((1, 16), np.float32), "INPUT1": np.ones((1, 16), np.float32)}
prompt = {"PROMPT": np.array([b"GPU hosts"], dtype=object), "MAX_TOKENS": np.array([4], np.int32)}
out = {}
with tracer.start_as_current_span("app-root") as root:
    out["trace_id"] = format(root.get_span_context().trace_id, "032x")
    out["root_span_id"] = format(root.get_span_context().span_id, "016x")
    with InferenceClient(args["address"], timeout=30) as client:
        result = client.infer("add_sub", ones, request_id="req-1")
        assert np.array_equal(result["OUTPUT0"], 2 * ones["INPUT0"])
        if args.get("all"):
            out["tokens"] = len(list(client.stream("textgen", prompt, request_id="stream-1")))
            try:
                client.infer("add_sub", {"INPUT0": np.ones((1, 3), np.float32),
                                         "INPUT1": np.ones((1, 3), np.float32)}, request_id="bad-1")
            except InvalidArgument:
                out["bad"] = "InvalidArgument"
            try:
                client.infer("no_such_model", ones)
            except NotFound:
                out["missing"] = "NotFound"

    async def concurrent():
        async with AsyncInferenceClient(args["address"], timeout=30) as client:
            await asyncio.gather(*(client.infer("add_sub", ones, request_id=f"async-{i}") for i in range(8)))
            return len([r async for r in client.stream("textgen", prompt, request_id="stream-2")])
    if args.get("all"):
        out["async_tokens"] = asyncio.run(concurrent())
if args["sdk"]:
    provider.shutdown()  # flushes every span to the receiver before exiting
print(json.dumps(out))
"""


def run_client_app(address: str, receiver: OtlpReceiver, *, sdk: bool = True, all_calls: bool = True) -> dict:
    """Run the traced application once against ``address``; returns what it printed."""
    args = {"address": address, "receiver": receiver.address, "sdk": sdk, "all": all_calls,
            "service": CLIENT_SERVICE}
    done = subprocess.run([sys.executable, "-c", _CLIENT_APP, json.dumps(args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S,
                          env=_env_without_otel())
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _env_without_otel() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}


def tracing_env(receiver: OtlpReceiver) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_BSP_SCHEDULE_DELAY": "50"}  # ms: spans reach the receiver at once


def off_env() -> dict[str, str]:
    """Clears, for the runtime, every OTEL_* variable the test process itself may have."""
    return {key: "" for key in os.environ if key.startswith("OTEL_")}


@pytest.fixture
def receiver():
    with OtlpReceiver() as running:
        yield running


def _one(spans: list[ReceivedSpan], **fields) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in fields.items())]
    assert len(found) == 1, (fields, [(s.name, s.attributes) for s in spans])
    return found[0]


def _by_request(spans: list[ReceivedSpan], kind: str, request_id: str) -> ReceivedSpan:
    found = [s for s in spans if s.kind == kind and s.attributes.get("meshserve.request.id") == request_id]
    assert len(found) == 1, (kind, request_id, [(s.name, s.attributes) for s in spans])
    return found[0]


def _children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> dict[str, ReceivedSpan]:
    children = [s for s in spans if s.parent_span_id == parent.span_id]
    assert len({s.name for s in children}) == len(children), [s.name for s in children]
    return {s.name: s for s in children}


def _server_spans_with_children(spans: list[ReceivedSpan], names: set[str], count: int):
    """Predicate: ``count`` runtime SERVER spans whose names are in ``names``, each with queue and execute."""
    servers = [s for s in spans if s.kind == "SERVER" and s.name in names]
    ids = {s.span_id for s in servers}
    children = [s for s in spans if s.parent_span_id in ids and s.name in ("queue", "execute")]
    return len(servers) >= count and len(children) >= 2 * count


def test_client_and_runtime_spans_form_one_trace(receiver, start_runtime):
    runtime = start_runtime("--model-repository", EXAMPLES, "--model", "add_sub", "--model", "textgen",
                            env=tracing_env(receiver))
    app = run_client_app(runtime.address, receiver)
    assert (app["bad"], app["missing"], app["tokens"], app["async_tokens"]) == \
        ("InvalidArgument", "NotFound", 4, 4)

    # add_sub: req-1 and 8 async calls; textgen: two streams; each with queue and execute.
    wanted = {"ModelInfer add_sub", "ModelStreamInfer textgen"}
    spans = receiver.wait_for(lambda got: _server_spans_with_children(got, wanted, 11)
                              and any(s.name == "ModelInfer no_such_model" for s in got), SPAN_TIMEOUT_S)
    assert {s.trace_id for s in spans} == {app["trace_id"]}, "every span belongs to the application's trace"
    assert {s.service_name for s in spans} == {CLIENT_SERVICE, RUNTIME_SERVICE}
    root = _one(spans, span_id=app["root_span_id"])
    assert root.parent_span_id == ""

    # client span -> runtime SERVER span -> queue, execute
    client = _by_request(spans, "CLIENT", "req-1")
    assert client.name == "inference.GRPCInferenceService/ModelInfer"
    assert client.parent_span_id == root.span_id and client.service_name == CLIENT_SERVICE
    assert client.attributes["rpc.grpc.status_code"] == 0 and client.attributes["meshserve.model.name"] == "add_sub"
    server = _one(spans, parent_span_id=client.span_id)
    assert (server.name, server.kind, server.service_name) == ("ModelInfer add_sub", "SERVER", RUNTIME_SERVICE)
    assert server.attributes["meshserve.model.name"] == "add_sub"
    assert server.attributes["meshserve.model.version"] == "1"
    assert server.attributes["meshserve.request.id"] == "req-1"
    assert server.attributes["rpc.grpc.status_code"] == 0 and server.status_code == "UNSET"
    children = _children(spans, server)
    assert set(children) == {"queue", "execute"}
    queue, execute = children["queue"], children["execute"]
    assert server.start_ns <= queue.start_ns <= queue.end_ns <= execute.start_ns <= execute.end_ns <= server.end_ns
    assert execute.attributes["meshserve.batch.size"] >= 1
    assert execute.attributes["meshserve.batch.requests"] >= 1

    # the 8 concurrent async calls: each has its own server span and execute span; batch figures agree
    async_servers = [s for s in spans if s.kind == "SERVER"
                     and str(s.attributes.get("meshserve.request.id", "")).startswith("async-")]
    assert len(async_servers) == 8
    for span in async_servers:
        client_parent = _one(spans, span_id=span.parent_span_id)
        assert client_parent.kind == "CLIENT" and client_parent.parent_span_id == root.span_id
        execute = _children(spans, span)["execute"]
        assert 1 <= execute.attributes["meshserve.batch.requests"] <= execute.attributes["meshserve.batch.size"]

    # errors: status ERROR on both sides, with the gRPC code
    bad_client = _by_request(spans, "CLIENT", "bad-1")
    assert bad_client.status_code == "ERROR" and bad_client.attributes["rpc.grpc.status_code"] == 3
    bad_server = _one(spans, parent_span_id=bad_client.span_id)
    assert bad_server.status_code == "ERROR" and bad_server.attributes["rpc.grpc.status_code"] == 3
    assert "INPUT0" in bad_server.status_message
    assert any(event.name == "exception" for event in bad_server.events)
    missing = _one(spans, name="ModelInfer no_such_model")
    assert missing.status_code == "ERROR" and missing.attributes["rpc.grpc.status_code"] == 5


def test_a_stream_has_one_event_per_response(receiver, start_runtime):
    runtime = start_runtime("--model-repository", EXAMPLES, "--model", "add_sub", "--model", "textgen",
                            env=tracing_env(receiver))
    app = run_client_app(runtime.address, receiver)
    spans = receiver.wait_for(
        lambda got: _server_spans_with_children(got, {"ModelStreamInfer textgen"}, 2), SPAN_TIMEOUT_S)
    for request_id, tokens in (("stream-1", app["tokens"]), ("stream-2", app["async_tokens"])):
        server = _by_request(spans, "SERVER", request_id)
        assert server.name == "ModelStreamInfer textgen"
        # The client library asks for an empty final response: one per token, then the empty final one.
        events = [e for e in server.events if e.name == "response"]
        assert [e.attributes["meshserve.response.index"] for e in events] == list(range(tokens + 1))
        assert [e.attributes["meshserve.response.final"] for e in events] == [False] * tokens + [True]
        client = _one(spans, span_id=server.parent_span_id)
        assert (client.kind, client.name) == ("CLIENT", "inference.GRPCInferenceService/ModelStreamInfer")
        client_events = [e for e in client.events if e.name == "response"]
        assert [e.attributes["meshserve.response.final"] for e in client_events] == [False] * tokens + [True]
        assert client.attributes["rpc.grpc.status_code"] == 0
        children = _children(spans, server)
        assert set(children) == {"queue", "execute"}
        assert children["execute"].attributes == {"meshserve.batch.size": 1, "meshserve.batch.requests": 1}
        assert server.start_ns <= children["queue"].end_ns <= children["execute"].start_ns


def test_tracing_off_exports_nothing_and_serves(receiver, start_runtime):
    # One replica with no OTEL_* variables, one told "none" despite an endpoint.
    plain = start_runtime("--model-repository", EXAMPLES, "--model", "add_sub", "--model", "textgen",
                          env=off_env())
    refused = start_runtime("--model-repository", EXAMPLES, "--model", "add_sub", "--model", "textgen",
                            env={**tracing_env(receiver), "OTEL_TRACES_EXPORTER": "none"})
    for runtime in (plain, refused):
        app = run_client_app(runtime.address, receiver)  # a traced application: its own spans arrive
        assert app["tokens"] == 4 and app["async_tokens"] == 4
    # Stopping flushes whatever a replica would have queued; it exits cleanly.
    assert plain.stop() == 0 and refused.stop() == 0
    spans = receiver.spans
    assert spans and {s.service_name for s in spans} == {CLIENT_SERVICE}
    assert not [s for s in spans if s.kind == "SERVER"]


def test_no_sdk_in_the_application_still_gets_runtime_spans_without_a_client_span(receiver, start_runtime):
    """The library never configures the SDK: with none installed it records no client span; the runtime
    traces on its own (a root SERVER span, as the app has no trace context to send)."""
    runtime = start_runtime("--model-repository", EXAMPLES, "--model", "add_sub", env=tracing_env(receiver))
    run_client_app(runtime.address, receiver, sdk=False, all_calls=False)
    spans = receiver.wait_for(lambda got: _server_spans_with_children(got, {"ModelInfer add_sub"}, 1),
                              SPAN_TIMEOUT_S)
    assert {s.service_name for s in spans} == {RUNTIME_SERVICE}
    server = _one(spans, kind="SERVER")
    assert server.parent_span_id == ""
