"""Steady, bounded inference load through one address, counting every call's outcome.

The fault suite (tests/test_faults.py) runs each fault under this load and
asserts a failed-call budget. A call counts as failed when it fails as a user
would see it: after the client library's own retries (UNAVAILABLE only,
``clients.retry``), with the status code it ended with.

Bounds: ``workers`` threads, each making at most ``max_calls`` calls, each
call with a deadline of ``call_timeout_s``; ``stop()`` ends the load and
waits for the threads. Nothing here sleeps between calls: the load is as
steady as the server lets it be.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

import numpy as np

from meshserve.clients import InferenceClient
from meshserve.common.errors import MeshError

# Each call is tiny (add_sub on 16 floats); a call that takes this long is stuck, not slow.
CALL_TIMEOUT_S = 10.0
# A runaway bound: a fault test lasts well under a minute at a few hundred calls/s.
MAX_CALLS_PER_WORKER = 200_000


class SteadyLoad:
    """``workers`` closed-loop clients calling add_sub at ``address`` until ``stop()``.

    ``retries=0`` counts every failure the server answers (no client retries); the default is the
    client library's own policy, as a user would see it.
    """

    def __init__(self, address: str, workers: int = 4, model: str = "add_sub", retries: int | None = None,
                 call_timeout_s: float = CALL_TIMEOUT_S, max_calls: int = MAX_CALLS_PER_WORKER,
                 inputs: dict[str, np.ndarray] | None = None,
                 expect: Callable[[dict[str, np.ndarray]], bool] | None = None):
        """``inputs`` and ``expect`` (a check of the outputs) default to add_sub's."""
        self.address = address
        self.retries = retries
        self.model = model
        self.call_timeout_s = call_timeout_s
        self.max_calls = max_calls
        a = np.arange(16, dtype=np.float32)[None, :]
        self.inputs = inputs if inputs is not None else {"INPUT0": a, "INPUT1": a}
        self.expect = expect or (lambda out: np.array_equal(out["OUTPUT0"], 2 * a))
        self.succeeded = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.failure_examples: list[str] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._work, name=f"load-{i}", daemon=True) for i in range(workers)]

    def start(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def wait_calls(self, count: int, timeout: float = 60.0) -> None:
        """Block until ``count`` more calls have succeeded (the load is really flowing)."""
        target = self.succeeded + count
        deadline = time.monotonic() + timeout
        while self.succeeded < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"load did not reach {count} more calls: {self.summary()}")
            time.sleep(0.05)

    def stop(self) -> SteadyLoad:
        self._stopping.set()
        for thread in self._threads:
            thread.join(self.call_timeout_s * 4)
        return self

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def summary(self) -> str:
        return (f"{self.succeeded} succeeded, {self.failed} failed {dict(self.failures)}"
                + (f"; e.g. {self.failure_examples[:3]}" if self.failure_examples else ""))

    def _work(self) -> None:
        options = {} if self.retries is None else {"retries": self.retries}
        with InferenceClient(self.address, timeout=self.call_timeout_s, **options) as client:
            for _ in range(self.max_calls):
                if self._stopping.is_set():
                    return
                try:
                    out = client.infer(self.model, self.inputs)
                    if not self.expect(out):
                        self._fail("WRONG_ANSWER", repr(out)[:200])
                        continue
                except MeshError as err:
                    self._fail(err.code.name, str(err))
                    continue
                with self._lock:
                    self.succeeded += 1

    def _fail(self, code: str, message: str) -> None:
        with self._lock:
            self.failures[code] += 1
            if len(self.failure_examples) < 10:
                self.failure_examples.append(f"{code}: {message[:200]}")
