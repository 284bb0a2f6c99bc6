"""W3C trace context for outgoing calls.

When an OpenTelemetry span is current, the configured propagator (W3C
``traceparent``/``tracestate`` by default) is injected into the call's gRPC
metadata, so the proxy and the replica continue the caller's trace. With no
valid current span this is one context lookup and no metadata at all.
"""

from __future__ import annotations

from opentelemetry import propagate, trace

Metadata = tuple[tuple[str, str], ...]


def trace_metadata() -> Metadata | None:
    """gRPC metadata carrying the current trace context, or None when there is none."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    # gRPC metadata keys must be lowercase.
    return tuple((key.lower(), value) for key, value in carrier.items()) or None
