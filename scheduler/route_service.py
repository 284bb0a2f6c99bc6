"""``mesh.RouteService``: the route table the front proxy follows.

Only the leader serves watches; when it stops leading, every watch ends at
once with FAILED_PRECONDITION naming the new leader (when known), so a proxy
never keeps a deposed leader's stale table.
"""

from __future__ import annotations

from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc

from .core import SchedulerCore


class RouteService(mesh_grpc.RouteServiceServicer):
    def __init__(self, core: SchedulerCore):
        self.core = core

    async def WatchRoutes(self, request, context):
        queue = self.core.watch_routes()
        try:
            while (table := await queue.get()) is not None:
                yield table
            self.core.require_leader()     # None: this scheduler stepped down
        finally:
            self.core.unwatch_routes(queue)
