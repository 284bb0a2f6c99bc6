"""``mesh.ReplicaService/WatchLoad``: this replica's load, streamed to its node agent for the autoscaler.

The agent opens one stream per replica it runs and copies the latest figures
into its reports (``ReplicaStatus.in_flight``/``queued``). The stream sends
the current load at once, then whenever it changes, sampled at most every
``interval_ms`` (default 250 ms, bounded to [50 ms, 5 s]), and at least every
5 s so a silent stream is known to be alive. Sampling two integers per
interval costs nothing measurable; pushing on every call would cost a
message per call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc

DEFAULT_INTERVAL_S = 0.25
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.05, 5.0
KEEPALIVE_S = 5.0


class LoadServicer(mesh_grpc.ReplicaServiceServicer):
    def __init__(self, sample: Callable[[], tuple[int, int]]):
        """``sample()`` returns (in flight, queued) now; it must not block."""
        self._sample = sample

    async def WatchLoad(self, request: mesh.WatchLoadRequest, context) -> AsyncIterator[mesh.ReplicaLoad]:
        interval = request.interval_ms / 1000 if request.interval_ms else DEFAULT_INTERVAL_S
        interval = min(max(interval, MIN_INTERVAL_S), MAX_INTERVAL_S)
        last: tuple[int, int] | None = None
        quiet = 0.0
        while True:
            current = self._sample()
            if current != last or quiet >= KEEPALIVE_S:
                last, quiet = current, 0.0
                yield mesh.ReplicaLoad(in_flight=current[0], queued=current[1])
            await asyncio.sleep(interval)
            quiet += interval
