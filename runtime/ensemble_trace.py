"""One span per ensemble step, under the ensemble request's span.

Built only when tracing is on (the servicer passes a ``RequestTrace``);
otherwise the executor passes ``None`` and does no span work. A ``StepTrace``
stands where the step model expects a ``RequestTrace`` (same ``queued`` /
``started`` / ``finished`` / ``response`` / ``end`` calls), so an in-process
step's batcher reports its queue and compute time into it::

    ModelInfer pipe                SERVER (the servicer's)
    ├── step 1 preprocess          meshserve.step.queue_ns, meshserve.step.compute_ns
    │   ├── queue
    │   └── execute
    └── step 2 classify            meshserve.step.remote (HOST:PORT) for a remote step,
        └── ModelInfer classify    whose client call is a child span
"""

from __future__ import annotations

import contextlib
import time

from opentelemetry import trace

from meshserve.common.telemetry import BATCH_REQUESTS, BATCH_SIZE, MODEL_NAME, MODEL_VERSION, RequestTrace, mark_error

STEP_NUMBER = "meshserve.step.number"
STEP_QUEUE_NS = "meshserve.step.queue_ns"      # waiting in the step model's queue
STEP_COMPUTE_NS = "meshserve.step.compute_ns"  # the step model's execution (a remote step: the whole call)
STEP_REMOTE = "meshserve.step.remote"


class StepTrace:
    """The span of one step of one ensemble request; a stand-in for ``RequestTrace``."""

    __slots__ = ("tracer", "span", "_context", "_queued_ns", "_started_ns", "_execute",
                 "_queue_ns", "_compute_ns", "_responses")

    def __init__(self, parent: RequestTrace, number: int, model: str, remote: str | None = None):
        self.tracer = parent.tracer
        attributes: dict[str, str | int] = {STEP_NUMBER: number, MODEL_NAME: model}
        if remote:
            attributes[STEP_REMOTE] = remote
        self.span = self.tracer.start_span(f"step {number} {model}",
                                           context=trace.set_span_in_context(parent.span),
                                           attributes=attributes)
        self._context = trace.set_span_in_context(self.span)
        self._queued_ns: int | None = None
        self._started_ns: int | None = None
        self._execute: trace.Span | None = None
        self._queue_ns = 0
        self._compute_ns: int | None = None
        self._responses = 0

    def current(self):
        """A context manager making this span current (a remote call's client span becomes its child)."""
        return trace.use_span(self.span, end_on_exit=False)

    def model_version(self, version: str) -> None:
        self.span.set_attribute(MODEL_VERSION, version)

    def queued(self) -> None:
        self._queued_ns = time.time_ns()

    def started(self, now_ns: int, batch_size: int, requests: int) -> None:
        if self._queued_ns is not None:
            self._queue_ns = now_ns - self._queued_ns
            self.tracer.start_span("queue", context=self._context, start_time=self._queued_ns).end(end_time=now_ns)
            self._queued_ns = None
        self._started_ns = now_ns
        self._execute = self.tracer.start_span(
            "execute", context=self._context, start_time=now_ns,
            attributes={BATCH_SIZE: batch_size, BATCH_REQUESTS: requests})

    def finished(self, now_ns: int, error: BaseException | None = None) -> None:
        span, self._execute = self._execute, None
        if self._started_ns is not None:
            self._compute_ns = now_ns - self._started_ns
        if span is not None:
            if error is not None:
                mark_error(span, error)
            span.end(end_time=now_ns)

    def response(self, final: bool) -> None:
        self._responses += 1

    def end(self, error: BaseException | None = None) -> None:
        now = time.time_ns()
        self.finished(now, error)
        if self._queued_ns is not None:  # never left the queue
            self._queue_ns = now - self._queued_ns
        self.span.set_attribute(STEP_QUEUE_NS, self._queue_ns)
        if self._compute_ns is None:  # no batch reported (a remote step): the whole step
            start = getattr(self.span, "start_time", None)   # the SDK's spans have it, the no-op span not
            self._compute_ns = now - start if start else 0
        self.span.set_attribute(STEP_COMPUTE_NS, self._compute_ns)
        if error is not None:
            mark_error(self.span, error)
        self.span.end(end_time=now)


def current(step_trace: StepTrace | None):
    """``step_trace.current()``, or nothing to do when tracing is off."""
    return contextlib.nullcontext() if step_trace is None else step_trace.current()
