"""OpenTelemetry for the proxy, through the API only: one SERVER span per call, context passed on.

- The caller's W3C context (``traceparent``/``tracestate`` in the gRPC
  metadata) is extracted, the span ``proxy <Method>`` starts as its child,
  and that span's context is injected into the metadata sent to the
  replica, so the replica's span is the proxy span's child.
- Attributes: ``rpc.*`` semantic conventions, ``meshserve.model``,
  ``meshserve.replica``, ``meshserve.node``; each retry is an event.
- With no SDK configured the tracer is a no-op: the span is a
  non-recording wrapper of the caller's context, which is still passed on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from opentelemetry import propagate, trace

TRACER_NAME = "meshserve.proxy"
# Metadata the transport owns or that must not travel to the replica as is.
# authorization: a client's bearer token is for the proxy alone, never passed on to a replica.
_NOT_FORWARDED = frozenset({"user-agent", "content-type", "te", "host", "content-length", "authorization"})
_TRACE_KEYS = frozenset({"traceparent", "tracestate", "baggage"})

Metadata = tuple[tuple[str, str | bytes], ...]


def forwarded_metadata(incoming: Iterable[tuple[str, str | bytes]] | None) -> list[tuple[str, str | bytes]]:
    """The caller's metadata minus what the transport owns (``grpc-*``, pseudo headers) and trace keys."""
    return [
        (key, value) for key, value in incoming or ()
        if not key.startswith((":", "grpc-")) and key not in _NOT_FORWARDED and key not in _TRACE_KEYS
    ]


class ProxyTracing:
    def __init__(self, tracer_provider: trace.TracerProvider | None = None):
        self.tracer = trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)

    @contextlib.contextmanager
    def server_span(self, method: str, incoming: Iterable[tuple[str, str | bytes]] | None,
                    current: bool = True) -> Iterator[trace.Span]:
        """The ``proxy <method>`` span, child of the caller's context.

        ``current=False`` for an async generator (a stream's handler): the span
        is not made the current context, since a generator can be closed from
        another context than the one it started in, where detaching it fails
        ("Failed to detach context"). Such a caller passes the span to
        ``upstream_metadata`` itself.
        """
        carrier = {key: value for key, value in incoming or () if key in _TRACE_KEYS and isinstance(value, str)}
        parent = propagate.extract(carrier) if carrier else None
        attributes = {"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": method}
        if current:
            with self.tracer.start_as_current_span(
                f"proxy {method}", context=parent, kind=trace.SpanKind.SERVER, attributes=attributes,
                record_exception=True, set_status_on_exception=True,
            ) as span:
                yield span
            return
        span = self.tracer.start_span(f"proxy {method}", context=parent, kind=trace.SpanKind.SERVER,
                                      attributes=attributes)
        try:
            yield span
        except Exception as err:
            span.record_exception(err)
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(err).__name__}: {err}"))
            raise
        finally:
            span.end()

    @staticmethod
    def upstream_metadata(forwarded: list[tuple[str, str | bytes]], span: trace.Span | None = None) -> Metadata:
        """``forwarded`` plus the context of ``span``, or of the current span (call inside ``server_span``)."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span) if span is not None else None)
        return (*forwarded, *((key.lower(), value) for key, value in carrier.items()))
