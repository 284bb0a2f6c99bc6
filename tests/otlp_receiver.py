"""A real OTLP/gRPC trace receiver for tests: ``TraceService/Export`` on 127.0.0.1:0.

It speaks the collector protocol of ``opentelemetry-proto``, so anything
exporting with the standard OTLP/gRPC exporter (a runtime subprocess, the
proxy, the test process's own SDK) can point at ``receiver.endpoint``.
Received spans are flattened into ``ReceivedSpan`` records; tests poll them
with a deadline (``wait_for``), never by sleeping.

    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, ...}
        ...
        spans = receiver.wait_for(lambda spans: len(spans) >= 3, timeout=10)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


def _value(value: common_pb2.AnyValue):
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind)


def _attributes(pairs) -> dict:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass
class ReceivedEvent:
    name: str
    time_ns: int
    attributes: dict


@dataclass
class ReceivedSpan:
    """One exported span, ids as lowercase hex (W3C form); ``parent_span_id`` is "" for a root."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str  # "SERVER", "CLIENT", "INTERNAL", ...
    start_ns: int
    end_ns: int
    attributes: dict
    status_code: str  # "UNSET", "OK", "ERROR"
    status_message: str
    service_name: str | None
    scope: str
    events: list[ReceivedEvent] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace_id, span_id)

    @classmethod
    def from_proto(cls, span: trace_pb2.Span, resource: dict, scope: str) -> ReceivedSpan:
        return cls(
            name=span.name,
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_span_id=span.parent_span_id.hex(),
            kind=trace_pb2.Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
            start_ns=span.start_time_unix_nano,
            end_ns=span.end_time_unix_nano,
            attributes=_attributes(span.attributes),
            status_code=trace_pb2.Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
            status_message=span.status.message,
            service_name=resource.get("service.name"),
            scope=scope,
            events=[ReceivedEvent(e.name, e.time_unix_nano, _attributes(e.attributes)) for e in span.events],
            links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
        )


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver):
        self._receiver = receiver

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context):
        received = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                scope = scope_spans.scope.name
                received.extend(ReceivedSpan.from_proto(span, resource, scope) for span in scope_spans.spans)
        self._receiver._add(received)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """An OTLP/gRPC trace collector on loopback; thread-safe; a context manager."""

    def __init__(self, host: str = "127.0.0.1"):
        self._lock = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self.export_calls = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.port = self._server.add_insecure_port(f"{host}:0")
        if not self.port:
            raise OSError(f"cannot listen on {host}:0")
        self.address = f"{host}:{self.port}"
        self.endpoint = f"http://{self.address}"  # for OTEL_EXPORTER_OTLP_ENDPOINT (http: insecure)

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        self._server.stop(grace).wait()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)
            self.export_calls += 1
            self._lock.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        """A copy of every span received so far, in arrival order."""
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0) -> list[ReceivedSpan]:
        """The spans once ``predicate(spans)`` holds; AssertionError (listing them) after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(list(self._spans)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = [(s.name, s.service_name, s.trace_id[:8]) for s in self._spans]
                    raise AssertionError(f"spans not received within {timeout} s; got {names}")
                self._lock.wait(remaining)
            return list(self._spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """The spans of one trace received so far."""
        return [span for span in self.spans if span.trace_id == trace_id]
