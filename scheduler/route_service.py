"""``mesh.RouteService``: the route table the front proxy follows."""

from __future__ import annotations

from protos.mesh import control_pb2_grpc as mesh_grpc

from .core import SchedulerCore


class RouteService(mesh_grpc.RouteServiceServicer):
    def __init__(self, core: SchedulerCore):
        self.core = core

    async def WatchRoutes(self, request, context):
        self.core.require_leader()
        queue = self.core.watch_routes()
        try:
            while (table := await queue.get()) is not None:
                yield table
        finally:
            self.core.unwatch_routes(queue)
