"""Answers the scheduler's LogsRequests (``scheduler ctl logs``) from the replicas' kept output.

One task per request id. Guarantees:
- Every request gets at least one ``LogsChunk`` soon: the tail (possibly no
  lines), or an ``end`` with an ``error`` naming the problem (an unknown
  replica, a bad id, too many requests at once).
- Sizes are bounded whatever the request says: at most ``MAX_TAIL_LINES``
  lines and ``MAX_TAIL_BYTES`` bytes of tail, chunks of at most
  ``CHUNK_BYTES``, following at most ``MAX_FOLLOW_S`` and at most
  ``MAX_REQUESTS`` requests at once.
- Following ends, with a last chunk marked ``end``, at its deadline, on a
  cancel, when the replica is stopped or no longer this node's, or when
  the stream ends (``close``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from meshserve.protos.mesh import control_pb2 as pb

from .replica import STOPPED
from .replica_logs import ReplicaLogs
from .supervisor import Supervisor

log = logging.getLogger(__name__)

MAX_TAIL_LINES = 10_000
MAX_TAIL_BYTES = 16 * 1024 * 1024
MAX_FOLLOW_S = 24 * 3600
MAX_REQUESTS = 16
CHUNK_BYTES = 256 * 1024

Send = Callable[[pb.AgentMessage], Coroutine[Any, Any, None]]


def _chunks(lines: list[str]) -> list[list[str]]:
    """``lines`` in groups of at most ``CHUNK_BYTES`` (a longer single line is cut to fit)."""
    groups: list[list[str]] = [[]]
    size = 0
    for line in lines:
        line = line if len(line) <= CHUNK_BYTES // 4 else line[: CHUNK_BYTES // 4] + "…"
        if size + len(line) > CHUNK_BYTES and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(line)
        size += len(line) * 4   # characters to a UTF-8 bound
    return groups


class LogRequests:
    """Serves LogsRequests for one agent; ``handle`` each request, ``close`` when the stream ends."""

    def __init__(self, logs: ReplicaLogs | None, supervisor: Supervisor):
        self.logs = logs
        self.supervisor = supervisor
        self._tasks: dict[int, asyncio.Task] = {}

    def handle(self, request: pb.LogsRequest, send: Send) -> None:
        if request.cancel:
            task = self._tasks.get(request.request_id)
            if task is not None:
                task.cancel()
            return
        if request.request_id in self._tasks:
            return   # a repeated id: the first request is being answered
        if len(self._tasks) >= MAX_REQUESTS:
            self._refuse(request, send, f"too many log requests at once on this node (at most {MAX_REQUESTS})")
            return
        task = asyncio.create_task(self._answer(request, send), name=f"logs {request.request_id}")
        self._tasks[request.request_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(request.request_id, None))

    def _refuse(self, request: pb.LogsRequest, send: Send, error: str) -> None:
        task = asyncio.create_task(send(pb.AgentMessage(logs=pb.LogsChunk(
            request_id=request.request_id, end=True, error=error))))
        self._tasks[-request.request_id - 1] = task      # kept referenced until sent (never a request id)
        task.add_done_callback(lambda done: (self._tasks.pop(-request.request_id - 1, None),
                                             done.cancelled() or done.exception()))

    def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        self._tasks.clear()

    async def _answer(self, request: pb.LogsRequest, send: Send) -> None:
        request_id = request.request_id

        async def chunk(lines: list[str], end: bool = False, error: str = "") -> None:
            await send(pb.AgentMessage(logs=pb.LogsChunk(request_id=request_id, lines=lines, end=end, error=error)))

        replica_id = request.replica_id
        try:
            if self.logs is None:
                await chunk([], end=True, error="this node agent keeps no replica output (no state directory)")
                return
            try:
                known = self.logs.exists(replica_id)
            except ValueError as err:
                await chunk([], end=True, error=str(err))
                return
            if not known:
                await chunk([], end=True, error=f"no output kept for replica {replica_id!r} on this node")
                return
            lines, offset = await self.logs.tail(replica_id, min(request.tail_lines, MAX_TAIL_LINES),
                                                 min(request.max_bytes or MAX_TAIL_BYTES, MAX_TAIL_BYTES))
            groups = _chunks(lines)
            for group in groups[:-1]:
                await chunk(group)
            if not request.follow:
                await chunk(groups[-1], end=True)
                return
            await chunk(groups[-1])
            deadline = asyncio.get_running_loop().time() + min(request.follow_seconds or MAX_FOLLOW_S, MAX_FOLLOW_S)

            def done() -> bool:
                status = self.supervisor.status(replica_id)
                return (asyncio.get_running_loop().time() >= deadline or status is None
                        or status.state == STOPPED)

            async for new in self.logs.follow(replica_id, offset, done):
                for group in _chunks(new):
                    await chunk(group)
            await chunk([], end=True)
        except asyncio.CancelledError:
            raise
        except Exception as err:   # an unreadable file: say so, and keep the agent's stream
            log.warning("logs of replica %s: %r", replica_id[:80], err)
            try:
                await chunk([], end=True, error=f"cannot read the output of replica {replica_id[:80]!r}: {err}")
            except Exception:
                pass
