"""When a failed unary call is tried again, and how long to wait first.

Only status codes that mean the request never reached a model are retried:
by default UNAVAILABLE alone (no connection, the server going away, a proxy
with no replica). INVALID_ARGUMENT, INTERNAL, DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED and the rest are never retried, because the model may
already have run or the same request would fail the same way. Streams are
never retried: responses may already have been delivered.

The decision is a pure function (``RetryPolicy.next_delay``) and the two
loops take their clock, sleep and randomness as arguments, so tests run
without sleeping. The caller's deadline bounds the whole call, retries and
backoff included: a retry whose backoff would cross the deadline is not made.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from meshserve.common.errors import MeshError

T = TypeVar("T")

# Two retries ride out a dropped connection or a replica restart seen by a
# proxy, while a server that is really down still fails within ~0.2 s.
DEFAULT_MAX_RETRIES = 2
# 50 ms is about one reconnect on loopback or a LAN; doubling to a 1 s cap
# keeps the bounded worst case small.
DEFAULT_INITIAL_BACKOFF_S = 0.05
DEFAULT_MAX_BACKOFF_S = 1.0


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a unary call.

    ``max_retries`` is the number of extra attempts (0 disables retrying).
    The n-th retry (n = 0, 1, ...) waits ``min(initial_backoff * multiplier**n,
    max_backoff)``, reduced by up to ``jitter`` (a fraction) at random so that
    many clients do not retry in step.
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    initial_backoff: float = DEFAULT_INITIAL_BACKOFF_S
    max_backoff: float = DEFAULT_MAX_BACKOFF_S
    multiplier: float = 2.0
    jitter: float = 0.2
    retryable_codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff must be >= 0")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within [0, 1]")

    @classmethod
    def of(cls, retries: int | RetryPolicy) -> RetryPolicy:
        """A policy from the clients' ``retries`` argument: a count or a policy."""
        if isinstance(retries, RetryPolicy):
            return retries
        return cls(max_retries=int(retries))

    def backoff(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        delay = min(self.initial_backoff * self.multiplier**retry, self.max_backoff)
        return delay * (1.0 - self.jitter * rand())

    def next_delay(
        self,
        retry: int,
        error: MeshError,
        remaining: float | None,
        rand: Callable[[], float] = random.random,
    ) -> float | None:
        """Backoff before retry number ``retry`` after ``error``, or None to give up.

        Gives up when the code is not retryable, the retries are spent, or the
        backoff would use up the ``remaining`` seconds of the deadline.
        """
        if error.code not in self.retryable_codes or retry >= self.max_retries:
            return None
        delay = self.backoff(retry, rand)
        if remaining is not None and delay >= remaining:
            return None
        return delay


def _remaining(deadline: float | None, clock: Callable[[], float]) -> float | None:
    return None if deadline is None else deadline - clock()


def call_with_retries(
    attempt: Callable[[float | None], T],
    policy: RetryPolicy,
    timeout: float | None,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] = random.random,
) -> T:
    """Run ``attempt(seconds_left)`` until it succeeds or the policy gives up.

    ``attempt`` raises ``MeshError``; the last one is re-raised unchanged.
    """
    deadline = None if timeout is None else clock() + timeout
    retry = 0
    while True:
        try:
            return attempt(_remaining(deadline, clock))
        except MeshError as error:
            delay = policy.next_delay(retry, error, _remaining(deadline, clock), rand)
            if delay is None:
                raise
        sleep(delay)
        retry += 1


async def async_call_with_retries(
    attempt: Callable[[float | None], Awaitable[T]],
    policy: RetryPolicy,
    timeout: float | None,
    *,
    sleep: Callable[[float], Awaitable[None]],
    clock: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] = random.random,
) -> T:
    """The asyncio twin of ``call_with_retries`` (``sleep`` is ``asyncio.sleep``)."""
    deadline = None if timeout is None else clock() + timeout
    retry = 0
    while True:
        try:
            return await attempt(_remaining(deadline, clock))
        except MeshError as error:
            delay = policy.next_delay(retry, error, _remaining(deadline, clock), rand)
            if delay is None:
                raise
        await sleep(delay)
        retry += 1
