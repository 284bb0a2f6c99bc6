"""Follow a replica's load (``mesh.ReplicaService/WatchLoad``) for the agent's reports.

One stream per ready replica, opened by the agent when the replica becomes
ready and cancelled when it leaves. The figures go into the replica's status
and from there into every usage report (``ReplicaStatus.in_flight`` and
``queued``), where the scheduler's autoscaler reads them. A stream that fails
(the replica restarting, an older runtime without the service) reports zero
and is retried with backoff; it never affects the replica itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from meshserve.common.backoff import Backoff
from meshserve.common.security.tls import TlsConfig, aio_channel
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_MS = 250


async def watch_load(address: str, tls: TlsConfig | None, on_load: Callable[[int, int], None]) -> None:
    """Call ``on_load(in_flight, queued)`` with the replica's load until cancelled."""
    backoff = Backoff(initial_s=0.5, max_s=5.0, jitter=0.5)
    failures = 0
    while True:
        try:
            async with aio_channel(address, tls) as channel:
                stream = mesh_grpc.ReplicaServiceStub(channel).WatchLoad(
                    mesh.WatchLoadRequest(interval_ms=SAMPLE_INTERVAL_MS))
                async for load in stream:
                    failures = 0
                    on_load(load.in_flight, load.queued)
        except grpc.aio.AioRpcError as err:
            log.debug("load of the replica at %s: %s", address, err.code().name)
        on_load(0, 0)
        failures += 1
        await asyncio.sleep(backoff.delay(failures))
