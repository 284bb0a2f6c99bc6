"""``mesh.RouteService``: the route table the front proxy follows.

Only the leader serves watches; when it stops leading, every watch ends at
once with FAILED_PRECONDITION naming the new leader (when known), so a proxy
never keeps a deposed leader's stale table.
"""

from __future__ import annotations

from meshserve.common.errors import InvalidArgument
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc

from .core import SchedulerCore

MAX_DEPLOYMENT_NAME = 253   # longer than any valid name (scheduler/spec.py): refused before any lookup


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

    async def Wake(self, request, context):
        """A proxy holds a call for a deployment with no replica: ask for one (autoscaled) or say why not."""
        if not request.deployment or len(request.deployment) > MAX_DEPLOYMENT_NAME:
            raise InvalidArgument(f"Wake: a deployment name of 1 to {MAX_DEPLOYMENT_NAME} characters is required")
        return mesh.WakeResponse(message=self.core.wake(request.deployment))
