"""Calls for a model scaled to zero: held at the proxy while the scheduler starts a replica.

A route the scheduler marks ``wakes_on_call`` (an autoscaled deployment with
``min_replicas: 0`` and no ready replica) does not fail a call: the call is
held, the scheduler is asked for a replica (``RouteService.Wake``, at most
once per ``WAKE_EVERY_S`` per deployment while calls wait, so a lost request
or a leader change is covered), and the call goes on as soon as a route table
lists a ready replica for the model, unary and streaming alike.

Bounds: at most ``max_held`` calls wait at once (the rest fail at once), each
at most ``max_wait_s`` and never past its own deadline. Every failure is
UNAVAILABLE saying the model is starting, so clients retry; never NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from meshserve.common.errors import MeshError, Unavailable

from .routes import Route, RouteTable

log = logging.getLogger(__name__)

DEFAULT_MAX_HELD = 1000
DEFAULT_MAX_WAIT_S = 120.0
WAKE_EVERY_S = 2.0


class ColdStarts:
    def __init__(self, wake: Callable[[str], Awaitable[str]], table: Callable[[], RouteTable | None], *,
                 max_held: int = DEFAULT_MAX_HELD, max_wait_s: float = DEFAULT_MAX_WAIT_S):
        """``wake(deployment)`` asks the scheduler for a replica and returns its answer; ``table()`` is the
        current route table."""
        self._wake = wake
        self._table = table
        self.max_held = max_held
        self.max_wait_s = max_wait_s
        self.held = 0
        self._new_table = asyncio.Event()
        self._woken_at: dict[str, float] = {}
        self._answers: dict[str, str] = {}
        self._wakes: set[asyncio.Task] = set()

    def table_changed(self) -> None:
        """A new route table arrived: every held call looks again."""
        self._new_table.set()
        self._new_table = asyncio.Event()

    async def hold(self, model: str, version: str, routes: list[Route], wait_s: float | None) -> list[Route]:
        """Wait until ``model`` has a ready replica; return its routes then. Raises Unavailable past the bounds."""
        if self.held >= self.max_held:
            raise Unavailable(f"model '{model}' is starting (scaled to zero) and {self.held} calls already wait "
                              f"for it at this proxy; retry later")
        wait_s = self.max_wait_s if wait_s is None else min(self.max_wait_s, wait_s)
        deadline = time.monotonic() + wait_s
        self.held += 1
        try:
            while True:
                for deployment in {route.deployment for route in routes if route.wakes_on_call}:
                    self._send_wake(deployment)
                changed = self._new_table
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(min(remaining, WAKE_EVERY_S)):
                        await changed.wait()
                except TimeoutError:
                    pass
                table = self._table()
                if table is None:
                    continue
                routes = table.routes_for(model, version) or routes
                if any(route.endpoints for route in routes):
                    return routes
                if not any(route.wakes_on_call for route in routes):
                    break   # no longer a scale-from-zero deployment: the caller answers as for any model
        finally:
            self.held -= 1
        answers = "; ".join(sorted({self._answers[d] for d in {r.deployment for r in routes} if d in self._answers}))
        raise Unavailable(f"model '{model}' is starting (scaled to zero): no replica ready after {wait_s:.0f}s"
                          + (f" ({answers})" if answers else ""))

    def _send_wake(self, deployment: str) -> None:
        now = time.monotonic()
        if now - self._woken_at.get(deployment, float("-inf")) < WAKE_EVERY_S:
            return
        self._woken_at[deployment] = now
        task = asyncio.create_task(self._ask(deployment), name=f"wake {deployment}")
        self._wakes.add(task)
        task.add_done_callback(self._wakes.discard)

    async def _ask(self, deployment: str) -> None:
        try:
            self._answers[deployment] = await self._wake(deployment)
            log.info("asked for a replica of %s: %s", deployment, self._answers[deployment])
        except MeshError as err:
            self._answers[deployment] = f"the scheduler was not reached: {err}"
            log.warning("could not ask for a replica of %s: %s", deployment, err)
