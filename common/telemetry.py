"""OpenTelemetry tracing for the runtime (and any daemon of the mesh): setup, W3C over gRPC, request spans.

Guarantees:
- Off unless the standard environment asks for it: ``OTEL_TRACES_EXPORTER``
  naming ``otlp``, or (with it unset) ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set. ``OTEL_TRACES_EXPORTER=none``
  or ``OTEL_SDK_DISABLED=true`` wins over any endpoint. Off means no SDK is
  imported or installed: the API's no-op tracer, and ``runtime_tracer()``
  returns None so the servicer takes its untraced path.
- On: one SDK ``TracerProvider`` (resource ``service.name``, unless
  ``OTEL_SERVICE_NAME`` says otherwise) with a ``BatchSpanProcessor`` feeding
  the OTLP/gRPC exporter; every other ``OTEL_EXPORTER_OTLP_*`` and
  ``OTEL_BSP_*`` variable is read by the SDK itself. Exporting never blocks
  a request: spans are queued and sent from the processor's thread.
- ``shutdown_tracing`` flushes what is queued; call it once on exit.
- Trace context travels as W3C ``traceparent``/``tracestate`` gRPC metadata
  through the globally configured propagator (``extract_context``,
  ``inject_metadata``), so runtime, proxy and clients speak the same headers.

Span structure of one inference request (``RequestTrace``)::

    ModelInfer <model>        SERVER, child of the caller's traceparent
    ├── queue                 submitted to the model -> its batch starts
    └── execute               the batch (or stream) runs; meshserve.batch.size,
                              meshserve.batch.requests

A batch of several requests gives every request's trace its own ``execute``
span (same start and end, same batch attributes), so each trace is complete
on its own; the batch's other requests are not linked (a link per pair would
grow with the square of the batch).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Mapping

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from meshserve.common.errors import MeshError

log = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str], ...]

RUNTIME_TRACER = "meshserve.runtime"
_OTLP = "otlp"

# Attribute names: OpenTelemetry's RPC conventions where they exist, meshserve.* otherwise.
RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"
MODEL_NAME = "meshserve.model.name"
MODEL_VERSION = "meshserve.model.version"
REQUEST_ID = "meshserve.request.id"
BATCH_SIZE = "meshserve.batch.size"          # items in the batch (sum of the requests' batch sizes)
BATCH_REQUESTS = "meshserve.batch.requests"  # requests in the batch
RESPONSE_INDEX = "meshserve.response.index"
RESPONSE_FINAL = "meshserve.response.final"
INFERENCE_SERVICE = "inference.GRPCInferenceService"


# -- setup -------------------------------------------------------------------


def tracing_requested(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the standard OTEL_* variables in ``env`` ask for OTLP trace export (module docstring)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {name.strip().lower() for name in env.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()}
    if "none" in exporters:
        return False
    if exporters:
        unsupported = exporters - {_OTLP}
        if unsupported:
            log.warning("OTEL_TRACES_EXPORTER: only 'otlp' and 'none' are supported; ignoring %s",
                        ", ".join(sorted(unsupported)))
        return _OTLP in exporters
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure_tracing(service_name: str, env: Mapping[str, str] = os.environ):
    """Install an SDK TracerProvider exporting over OTLP/gRPC when ``env`` asks for it.

    Returns the provider, or None when tracing stays off (then nothing is
    imported or installed and every tracer is the API's no-op tracer).
    """
    if not tracing_requested(env):
        return None
    # Imported here: a replica with tracing off never loads the SDK or the exporter.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME; ours is only the default.
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("tracing: exporting spans over OTLP/gRPC to %s",
             env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
             or "the default endpoint (localhost:4317)")
    return provider


def shutdown_tracing(provider=None) -> None:
    """Flush queued spans and stop exporting; a no-op when tracing is off.

    ``provider`` defaults to the global one (what ``configure_tracing`` installed).
    """
    provider = provider if provider is not None else trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)  # the API's providers have none
    if shutdown is not None:
        shutdown()


def tracing_enabled() -> bool:
    """True when an SDK (recording) TracerProvider is installed globally."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def runtime_tracer() -> trace.Tracer | None:
    """The runtime's tracer, or None when tracing is off (the caller then skips all span work).

    Decided when called: configure tracing before building the servicer.
    """
    return trace.get_tracer(RUNTIME_TRACER) if tracing_enabled() else None


# -- W3C trace context over gRPC metadata ------------------------------------


def extract_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> otel_context.Context:
    """The trace context carried by gRPC ``metadata`` (``invocation_metadata()``), or an empty one."""
    carrier = {}
    for key, value in metadata or ():
        if not key.endswith("-bin"):  # binary headers carry no W3C context
            carrier[key] = value
    return propagate.extract(carrier)


def inject_metadata(context: otel_context.Context | None = None) -> Metadata:
    """gRPC metadata carrying ``context`` (default: the current one); empty when it has no span."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return tuple((key.lower(), value) for key, value in carrier.items())  # gRPC keys are lowercase


# -- request spans ------------------------------------------------------------


def status_code_of(error: BaseException | None) -> int:
    """The gRPC status code number the request is answered with (0 for success)."""
    if error is None:
        return grpc.StatusCode.OK.value[0]
    if isinstance(error, MeshError):
        return error.code.value[0]
    if isinstance(error, asyncio.CancelledError):  # the caller went away
        return grpc.StatusCode.CANCELLED.value[0]
    return grpc.StatusCode.INTERNAL.value[0]  # what StatusInterceptor answers for a bug


def mark_error(span: trace.Span, error: BaseException) -> None:
    """Status ERROR with the error's message, the exception as an event."""
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    span.set_status(Status(StatusCode.ERROR, message))
    span.record_exception(error)


class RequestTrace:
    """The spans of one inference request: its SERVER span and the queue/execute children.

    Built by the servicer only when tracing is on; the data plane (model,
    batcher) calls ``queued``, ``started`` and ``finished`` with wall-clock
    nanoseconds shared by a whole batch, and ``end`` closes everything.
    """

    __slots__ = ("tracer", "span", "_parent", "_queued_ns", "_execute", "_responses")

    def __init__(self, tracer: trace.Tracer, rpc: str, model: str, request_id: str,
                 parent: otel_context.Context):
        self.tracer = tracer
        self.span = tracer.start_span(
            f"{rpc} {model}", context=parent, kind=SpanKind.SERVER,
            attributes={RPC_SYSTEM: "grpc", RPC_SERVICE: INFERENCE_SERVICE, RPC_METHOD: rpc,
                        MODEL_NAME: model, REQUEST_ID: request_id},
        )
        self._parent = trace.set_span_in_context(self.span)
        self._queued_ns: int | None = None
        self._execute: trace.Span | None = None
        self._responses = 0

    def model_version(self, version: str) -> None:
        self.span.set_attribute(MODEL_VERSION, version)

    def queued(self) -> None:
        """The request entered its model's queue (or waits for a free instance)."""
        self._queued_ns = time.time_ns()

    def started(self, now_ns: int, batch_size: int, requests: int) -> None:
        """Its batch starts: the queue span ends, the execute span begins."""
        self._end_queue(now_ns)
        self._execute = self.tracer.start_span(
            "execute", context=self._parent, start_time=now_ns,
            attributes={BATCH_SIZE: batch_size, BATCH_REQUESTS: requests},
        )

    def finished(self, now_ns: int, error: BaseException | None = None) -> None:
        """Its batch (or stream) is over; ``error`` failed it."""
        span, self._execute = self._execute, None
        if span is not None:
            if error is not None:
                mark_error(span, error)
            span.end(end_time=now_ns)

    def response(self, final: bool) -> None:
        """One streamed response went out (an event on the SERVER span)."""
        self.span.add_event("response", {RESPONSE_INDEX: self._responses, RESPONSE_FINAL: final})
        self._responses += 1

    def end(self, error: BaseException | None = None) -> None:
        """Close the request: spans still open end now; ``error`` is its outcome."""
        now = time.time_ns()
        self._end_queue(now, error)
        self.finished(now, error)
        self.span.set_attribute(RPC_GRPC_STATUS_CODE, status_code_of(error))
        if error is not None:
            mark_error(self.span, error)
        self.span.end(end_time=now)

    def _end_queue(self, now_ns: int, error: BaseException | None = None) -> None:
        """Emit the queue span (started at ``queued``) if the request was queued and it is still open."""
        start, self._queued_ns = self._queued_ns, None
        if start is None:
            return
        span = self.tracer.start_span("queue", context=self._parent, start_time=start)
        if error is not None:  # it never left the queue: timed out, cancelled or refused
            mark_error(span, error)
        span.end(end_time=now_ns)
