"""Forwards ``ctl logs`` to the agent that runs the replica, over that agent's own stream, and back.

The agent needs no listening port of its own: the request travels as a
``SchedulerMessage.logs`` on the stream the agent opened (with its TLS and
identity), the answer as ``AgentMessage.logs`` chunks of the same id. So logs
follow the existing auth model: ``AdminService.ReplicaLogs`` is checked by the
scheduler's role table like any admin read.

Guarantees:
- A chunk is accepted only from the stream its request was sent on; one
  from another agent or an unknown id is dropped.
- Each request holds at most ``QUEUE_CHUNKS`` unread chunks: a reader slower
  than the replica's output ends with an error (and the agent is told to
  stop) instead of growing the scheduler's memory.
- A request whose agent stream ends sees ``None``; ``close`` (the reader is
  done or gone) tells the agent to stop, if its stream is still open.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from meshserve.protos.mesh import control_pb2 as mesh

QUEUE_CHUNKS = 64
OVERFLOW = mesh.LogsChunk(end=True, error="the reader fell too far behind the replica's output; follow again")


@dataclass
class _Pending:
    node: str
    channel: asyncio.Queue          # the agent stream's outgoing queue the request went on
    chunks: asyncio.Queue


class LogRelay:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}

    @contextmanager
    def request(self, node: str, channel: asyncio.Queue, request: mesh.LogsRequest) -> Iterator[asyncio.Queue]:
        """Send ``request`` on ``channel`` (node's agent stream); yields the queue its chunks arrive on."""
        request_id = next(self._ids)
        request.request_id = request_id
        pending = _Pending(node, channel, asyncio.Queue(maxsize=QUEUE_CHUNKS + 1))
        self._pending[request_id] = pending
        channel.put_nowait(mesh.SchedulerMessage(logs=request))
        try:
            yield pending.chunks
        finally:
            self._close(request_id)

    def _close(self, request_id: int) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            pending.channel.put_nowait(mesh.SchedulerMessage(logs=mesh.LogsRequest(request_id=request_id,
                                                                                   cancel=True)))

    def deliver(self, node: str, channel: asyncio.Queue, chunk: mesh.LogsChunk) -> None:
        """A chunk from ``node``'s stream ``channel``."""
        pending = self._pending.get(chunk.request_id)
        if pending is None or pending.node != node or pending.channel is not channel:
            return
        if pending.chunks.qsize() >= QUEUE_CHUNKS:
            pending.chunks.put_nowait(OVERFLOW)
            self._close(chunk.request_id)
            return
        pending.chunks.put_nowait(chunk)

    def stream_ended(self, channel: asyncio.Queue) -> None:
        """The agent stream behind ``channel`` is gone: its requests get ``None``."""
        for request_id, pending in list(self._pending.items()):
            if pending.channel is channel:
                del self._pending[request_id]
                pending.chunks.put_nowait(None)
