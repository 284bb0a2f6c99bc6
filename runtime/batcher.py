"""Dynamic batching: one queue, one drain task, a future per request.

Guarantees:
- A batch never holds more than ``max_batch_size`` items (the sum of the
  requests' batch sizes) and holds only requests that can be stacked: the
  same input names, each input with the same shape past the batch axis (as
  Triton's dynamic batcher). A variable dim (``dims: [-1]``) is therefore
  batched only with requests of the same length. A request that cannot join
  the batch being formed is skipped, not failed: it stays at its place in the
  queue and heads a later batch, so no request fails for its neighbour's
  shape and none waits behind more than one batch of others.
- A batch is formed only when an instance is free, so under load the queue
  grows while instances work and the next batch is larger (adaptive
  batching). A request waits at most ``max_queue_delay`` for company, and
  only while requests arrive faster than that (an average gap between
  arrivals shorter than the delay): a lone client never pays the delay for
  company that cannot come. It does not wait once the preferred (largest)
  size is reached.
- With batching off, every request executes alone (the same queue, one
  request per batch), bounded by the number of instances.
- The queue is bounded: past ``max_queue_size`` waiting requests a submit
  fails with RESOURCE_EXHAUSTED. A request whose queue deadline passes fails
  with DEADLINE_EXCEEDED without running; one whose caller went away is
  dropped.
- An exception in a batch fails exactly the requests of that batch, each
  with INTERNAL and the exception's message; the batcher keeps serving.
- An instance with ``executes_requests`` (a Triton python model) gets the
  batch as a list of requests, not stacked inputs, and answers one result
  per request: its outputs, or a MeshError failing that request alone.
- A request submitted with a ``RequestTrace`` (tracing on) is told when its
  batch starts and ends, with the batch's size; untraced requests cost one
  ``is None`` test per batch member.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

import numpy as np

from meshserve.common.errors import DeadlineExceeded, Internal, MeshError, ResourceExhausted, Unavailable
from meshserve.common.telemetry import RequestTrace

from .instance_pool import InstancePool
from .request import InferRequest
from .statistics import ModelStatisticsRecorder

log = logging.getLogger(__name__)

# Weight of the newest gap in the moving average of inter-arrival times: about
# the last ten arrivals count, so the batcher adapts within a few requests.
_GAP_SMOOTHING = 0.2
# How many queued requests a batch being formed looks at for company that
# fits (skipping those of other shapes). Beyond this the queue is deep enough
# that the next batches fill anyway; it bounds the work per batch in a long
# queue of mixed shapes.
_SCAN_LIMIT = 256


@dataclass(frozen=True)
class BatchingPolicy:
    enabled: bool
    max_batch_size: int  # 0: the model takes no batch axis
    preferred_size: int  # dispatch at once when a batch reaches this many items
    max_queue_delay_s: float
    max_queue_size: int  # 0: unbounded


@dataclass
class _Pending:
    request: InferRequest
    future: asyncio.Future
    trace: RequestTrace | None = None
    shapes: tuple = ()  # what must match to share a batch (``_stack_key``)


def _stack_key(request: InferRequest) -> tuple:
    """Requests can be stacked along the batch axis only if these are equal."""
    return tuple(sorted((name, array.shape[1:]) for name, array in request.inputs.items()))


class Batcher:
    """Queues requests of one model version and runs them in batches on its instances."""

    def __init__(self, model: str, pool: InstancePool, policy: BatchingPolicy,
                 stats: ModelStatisticsRecorder, clock=time.monotonic):
        self._clock = clock  # measures arrival gaps and queue deadlines
        self._model = model
        self._pool = pool
        self._policy = policy
        self._stats = stats
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._progress = asyncio.Event()  # set whenever the queue shrinks or a batch ends
        self._running: set[asyncio.Task] = set()
        self._closed = False
        self._last_arrival = 0.0
        self._arrival_gap_s = float("inf")  # moving average of the time between arrivals
        self._task = asyncio.get_running_loop().create_task(self._drain(), name=f"batcher-{model}")

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def submit(self, request: InferRequest, trace: RequestTrace | None = None) -> asyncio.Future:
        """Queue ``request``; the future resolves to its outputs or to a MeshError."""
        if self._closed:
            raise Unavailable(f"model '{self._model}' is unloading and takes no new requests")
        limit = self._policy.max_queue_size
        if limit and len(self._queue) >= limit:
            self._drop_dead()
        if limit and len(self._queue) >= limit:
            raise ResourceExhausted(
                f"queue of model '{self._model}' is full ({limit} requests waiting); retry later"
            )
        now = self._clock()
        # A long idle spell counts as two delays, so a few quick arrivals restore waiting.
        gap = min(now - self._last_arrival, 2 * self._policy.max_queue_delay_s)
        self._last_arrival = now
        self._arrival_gap_s = gap if self._arrival_gap_s == float("inf") else \
            _GAP_SMOOTHING * gap + (1 - _GAP_SMOOTHING) * self._arrival_gap_s
        future = asyncio.get_running_loop().create_future()
        if trace is not None:
            trace.queued()
        shapes = _stack_key(request) if self._policy.enabled else ()
        self._queue.append(_Pending(request, future, trace, shapes))
        self._arrived.set()
        return future

    async def _wait_for_arrival(self, timeout: float | None) -> None:
        self._arrived.clear()
        if timeout is None:
            await self._arrived.wait()
            return
        if timeout > 0:
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            except TimeoutError:
                pass

    def _is_dead(self, pending: _Pending, now: float) -> bool:
        """True (and the request failed if it timed out) when it is not worth running any more."""
        if pending.future.done():  # the caller went away
            return True
        deadline = pending.request.deadline
        if deadline is not None and now > deadline:
            pending.future.set_exception(DeadlineExceeded(
                f"request {pending.request.id!r} timed out in the queue of model '{self._model}'"
            ))
            return True
        return False

    def _drop_dead(self) -> None:
        """Free the queue slots of abandoned and timed-out requests (only needed when full)."""
        now = self._clock()
        live = collections.deque(p for p in self._queue if not self._is_dead(p, now))
        if len(live) != len(self._queue):
            self._queue = live
            self._progress.set()

    def _pop_live(self) -> _Pending | None:
        """The oldest queued request still worth running; expired ones fail here."""
        while self._queue:
            pending = self._queue[0]
            if self._is_dead(pending, self._clock()):
                self._queue.popleft()
                self._progress.set()
                continue
            return pending
        return None

    def _take_company(self, shapes: tuple, room: int) -> tuple[_Pending | None, bool]:
        """Remove and return the oldest live queued request (within ``_SCAN_LIMIT``) that
        stacks with ``shapes`` in at most ``room`` items; also whether a live request that
        cannot join was seen (it is waiting, so the batch should not wait any longer)."""
        now = self._clock()
        queue = self._queue
        blocked = False
        index = 0
        while index < len(queue) and index < _SCAN_LIMIT:
            pending = queue[index]
            if self._is_dead(pending, now):
                del queue[index]
                self._progress.set()
                continue
            if pending.shapes == shapes and pending.request.batch_size <= room:
                del queue[index]
                return pending, blocked
            blocked = True
            index += 1
        return None, blocked

    async def _next_batch(self) -> list[_Pending]:
        while self._pop_live() is None:
            await self._wait_for_arrival(None)
        policy = self._policy
        first = self._queue.popleft()
        batch, size = [first], first.request.batch_size
        if not policy.enabled:
            return batch
        flush_at = self._clock() + policy.max_queue_delay_s
        while size < policy.preferred_size:
            candidate, blocked = self._take_company(first.shapes, policy.max_batch_size - size)
            if candidate is not None:
                batch.append(candidate)
                size += candidate.request.batch_size
                continue
            remaining = flush_at - self._clock()
            if blocked or remaining <= 0 or self._arrival_gap_s > policy.max_queue_delay_s:
                break
            await self._wait_for_arrival(remaining)
        return batch

    async def _drain(self) -> None:
        while True:
            instance = await self._pool.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._pool.release(instance)
                raise
            task = asyncio.create_task(self._execute(instance, batch))
            self._running.add(task)
            task.add_done_callback(self._finished)
            self._progress.set()

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._progress.set()

    async def _execute(self, instance, batch: list[_Pending]) -> None:
        started = time.perf_counter_ns()
        traces = None
        for pending in batch:
            self._stats.record_queue(started - pending.request.arrival_ns)
            if pending.trace is not None:
                traces = traces or []
                traces.append(pending.trace)
        sizes = [pending.request.batch_size for pending in batch]
        total = sum(sizes)
        if traces:
            _traces_started(traces, total, len(batch))
        error = None
        try:
            if getattr(instance, "executes_requests", False):  # a Triton python model: a list of requests
                input_done = time.perf_counter_ns()
                results = await instance.execute_requests([pending.request for pending in batch])
                infer_done = output_done = time.perf_counter_ns()
            else:
                inputs = _concatenate([pending.request.inputs for pending in batch])
                input_done = time.perf_counter_ns()
                outputs = await instance.execute(inputs)
                infer_done = time.perf_counter_ns()
                results = self._split(outputs, sizes, total)
                output_done = time.perf_counter_ns()
        except MeshError as err:
            error = err
            self._fail(batch, err)
        except Exception as err:  # the predictor's own failure: fail this batch only
            log.warning("model '%s' failed a batch of %d: %r", self._model, total, err)
            error = Internal(f"model '{self._model}' failed: {type(err).__name__}: {err}")
            self._fail(batch, error)
        else:
            self._stats.record_batch(len(batch), total, input_done - started,
                                     infer_done - input_done, output_done - infer_done)
            for pending, result in zip(batch, results, strict=True):
                if pending.future.done():
                    continue
                if isinstance(result, MeshError):  # that request's own error response
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
        finally:
            self._pool.release(instance)
            if traces:
                _traces_finished(traces, error)

    def _split(self, outputs: dict[str, np.ndarray], sizes: list[int], total: int) -> list[dict]:
        if self._policy.max_batch_size == 0:
            return [outputs]
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise Internal(
                    f"model '{self._model}' returned output '{name}' with shape {list(array.shape)}; "
                    f"its first axis must be the batch size {total}"
                )
        if len(sizes) == 1:
            return [outputs]
        bounds = np.cumsum(sizes)[:-1]
        parts = {name: np.split(array, bounds) for name, array in outputs.items()}
        return [{name: parts[name][i] for name in outputs} for i in range(len(sizes))]

    @staticmethod
    def _fail(batch: list[_Pending], error: MeshError) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error)

    async def close(self) -> None:
        """Stop taking requests, let queued and running ones finish, then stop."""
        self._closed = True
        while self._queue or self._running:
            self._progress.clear()
            await self._progress.wait()
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


def _traces_started(traces: list[RequestTrace], batch_size: int, requests: int) -> None:
    now = time.time_ns()  # one instant for the whole batch, in every request's trace
    for trace in traces:
        trace.started(now, batch_size, requests)


def _traces_finished(traces: list[RequestTrace], error: MeshError | None) -> None:
    now = time.time_ns()
    for trace in traces:
        trace.finished(now, error)


def _concatenate(inputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(inputs) == 1:
        return inputs[0]
    return {name: np.concatenate([item[name] for item in inputs]) for name in inputs[0]}
