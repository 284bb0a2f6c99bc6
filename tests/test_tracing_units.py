"""Unit tests of runtime/telemetry.py: when tracing turns on, W3C over metadata, request spans in a batch.

Spans are recorded by a local SDK provider with an in-memory exporter; the
global provider is never set here, so other tests see the no-op tracer.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from meshserve.common import telemetry
from meshserve.common.errors import DeadlineExceeded
from meshserve.common.telemetry import RequestTrace, extract_context, inject_metadata, tracing_requested
from meshserve.runtime.batcher import Batcher, BatchingPolicy
from meshserve.runtime.instance_pool import InstancePool
from meshserve.runtime.request import InferRequest
from meshserve.runtime.statistics import ModelStatisticsRecorder


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_TRACES_EXPORTER": "console"}, False),  # unsupported: warned about, off
    ({"OTEL_TRACES_EXPORTER": "otlp,console"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
])
def test_tracing_is_requested_only_by_the_standard_variables(env, expected):
    assert tracing_requested(env) is expected


def test_off_installs_nothing_and_loads_no_sdk():
    """In a fresh interpreter: configure_tracing with no OTEL_* returns None, the global provider stays
    the API's proxy, the SDK and the exporter are never imported, shutdown is harmless."""
    script = (
        "import sys\n"
        "from opentelemetry import trace\n"
        "from meshserve.common import telemetry\n"
        "assert telemetry.configure_tracing('x', env={}) is None\n"
        "assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)\n"
        "assert telemetry.runtime_tracer() is None\n"
        "telemetry.shutdown_tracing()\n"
        "loaded = [m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def test_on_installs_an_sdk_provider_named_after_the_service():
    script = (
        "from opentelemetry import trace\n"
        "from meshserve.common import telemetry\n"
        "env = {'OTEL_TRACES_EXPORTER': 'otlp', 'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://127.0.0.1:9'}\n"
        "provider = telemetry.configure_tracing('svc', env=env)\n"
        "assert provider is trace.get_tracer_provider()\n"
        "assert provider.resource.attributes['service.name'] == 'svc'\n"
        "assert telemetry.runtime_tracer() is not None\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "OTEL_BSP_EXPORT_TIMEOUT": "100"})
    assert done.returncode == 0, done.stderr


def test_w3c_context_round_trips_through_grpc_metadata():
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("caller") as span:
        metadata = inject_metadata()
    assert all(key == key.lower() for key, _ in metadata)
    parent = trace.get_current_span(extract_context(metadata + (("other-bin", b"\x00"),))).get_span_context()
    assert (parent.trace_id, parent.span_id) == (span.get_span_context().trace_id, span.get_span_context().span_id)
    assert parent.is_remote
    assert not trace.get_current_span(extract_context(None)).get_span_context().is_valid
    assert inject_metadata() == ()  # no current span: nothing to send


@pytest.fixture
def recorded():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


class GatedInstance:
    """Doubles its input; every execution waits for the test to open the gate."""

    def __init__(self):
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def execute(self, inputs):
        self.started.set()
        await self.gate.wait()
        return {"Y": inputs["X"] * 2}


def _request(value: float, deadline: float | None = None) -> InferRequest:
    return InferRequest(id=f"r{value}", inputs={"X": np.full((1, 2), value, np.float32)}, batch_size=1,
                        requested_outputs=None, parameters={}, deadline=deadline)


def test_each_request_of_a_batch_gets_its_own_execute_span(recorded):
    tracer, exporter = recorded

    async def body():
        instance = GatedInstance()
        policy = BatchingPolicy(enabled=True, max_batch_size=8, preferred_size=8, max_queue_delay_s=0.0,
                                max_queue_size=0)
        batcher = Batcher("m", InstancePool([instance]), policy, ModelStatisticsRecorder("m", "1"))
        first = batcher.submit(_request(0))  # occupies the only instance
        await instance.started.wait()
        traces = [RequestTrace(tracer, "ModelInfer", "m", f"r{v}", extract_context(None)) for v in (1, 2, 3)]
        futures = [batcher.submit(_request(v), t) for v, t in zip((1, 2, 3), traces, strict=True)]
        instance.gate.set()
        await asyncio.gather(first, *futures)
        for t in traces:
            t.end()
        await batcher.close()

    asyncio.run(asyncio.wait_for(body(), 30))
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(servers) == 3 and {s.name for s in servers} == {"ModelInfer m"}
    assert len({s.context.trace_id for s in servers}) == 3  # three independent traces
    for server in servers:
        children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == server.context.span_id}
        assert set(children) == {"queue", "execute"}
        assert children["queue"].end_time <= children["execute"].start_time
        assert dict(children["execute"].attributes) == {"meshserve.batch.size": 3, "meshserve.batch.requests": 3}
        assert server.attributes["rpc.grpc.status_code"] == 0
    executes = [s for s in spans if s.name == "execute"]
    assert len({(s.start_time, s.end_time) for s in executes}) == 1  # one batch, one instant in every trace


def test_a_request_that_times_out_in_the_queue_has_an_error_queue_span_and_no_execute(recorded):
    tracer, exporter = recorded

    async def body():
        instance = GatedInstance()
        policy = BatchingPolicy(enabled=False, max_batch_size=8, preferred_size=1, max_queue_delay_s=0.0,
                                max_queue_size=0)
        batcher = Batcher("m", InstancePool([instance]), policy, ModelStatisticsRecorder("m", "1"))
        first = batcher.submit(_request(0))
        await instance.started.wait()
        late = RequestTrace(tracer, "ModelInfer", "m", "late", extract_context(None))
        expired = batcher.submit(_request(1, deadline=0.0), late)  # monotonic time 0 is long past
        instance.gate.set()
        await first
        with pytest.raises(DeadlineExceeded) as caught:
            await expired
        late.end(caught.value)
        await batcher.close()

    asyncio.run(asyncio.wait_for(body(), 30))
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"ModelInfer m", "queue"}
    assert spans["queue"].status.status_code == StatusCode.ERROR
    server = spans["ModelInfer m"]
    assert server.status.status_code == StatusCode.ERROR and "timed out" in server.status.description
    assert server.attributes["rpc.grpc.status_code"] == 4  # DEADLINE_EXCEEDED
    assert any(event.name == "exception" for event in server.events)


def test_status_codes_of_outcomes():
    assert telemetry.status_code_of(None) == 0
    assert telemetry.status_code_of(DeadlineExceeded("x")) == 4
    assert telemetry.status_code_of(asyncio.CancelledError()) == 1
    assert telemetry.status_code_of(ValueError("bug")) == 13


def test_a_proxy_stream_span_passes_its_context_on_without_becoming_current():
    """A stream's span (proxy/tracing.py, current=False) is the parent the replica sees, and is never the
    current context, so closing the stream's generator elsewhere has nothing to detach."""
    from meshserve.proxy.tracing import ProxyTracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = ProxyTracing(provider)
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with tracing.server_span("ModelStreamInfer", [("traceparent", caller)], current=False) as span:
        assert trace.get_current_span() is not span
        metadata = dict(tracing.upstream_metadata([], span))
    context = span.get_span_context()
    assert metadata["traceparent"] == f"00-{context.trace_id:032x}-{context.span_id:016x}-01"
    (finished,) = exporter.get_finished_spans()
    assert finished.parent.span_id == 0xb7ad6b7169203331 and finished.kind == SpanKind.SERVER
