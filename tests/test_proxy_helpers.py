"""Shared helpers of the proxy tests (``tests/test_proxy*.py``); no tests here.

``LoopThread`` runs an asyncio loop in a thread so the synchronous tests can
drive in-process grpc.aio servers: the proxy itself and ``FakeRoutes``, a
real ``mesh.RouteService`` on 127.0.0.1:0 whose table the test sets.
"""

from __future__ import annotations

import asyncio
import threading

import grpc

from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc
from meshserve.proxy import ProxyOptions, ProxyServer

# Bounds a hung call; not a performance claim.
RPC_TIMEOUT_S = 30.0


class LoopThread:
    """An event loop in a daemon thread; ``run(coro)`` waits for the result from the calling thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = RPC_TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args):
        """Run a plain function on the loop (for loop-owned state)."""
        async def wrapper():
            return fn(*args)
        return self.run(wrapper())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def route(model: str, *endpoints: tuple[str, str], weight: int = 100, deployment: str = "",
          version: str = "", node: str = "node-a") -> mesh.Route:
    """A mesh.Route over ``(replica_id, address)`` pairs."""
    return mesh.Route(model=model, version=version, deployment=deployment or model, revision=1, weight=weight,
                      endpoints=[mesh.Endpoint(replica_id=rid, address=addr, node=node) for rid, addr in endpoints])


class FakeRoutes(mesh_grpc.RouteServiceServicer):
    """A real RouteService: streams the current table at once and on every ``publish``."""

    def __init__(self, refuse_with: str | None = None, cluster_id: str = ""):
        self.cluster_id = cluster_id
        self.table = mesh.RouteTable(cluster_id=cluster_id)
        self.refuse_with = refuse_with
        self.watchers: set[asyncio.Queue] = set()
        self.watch_calls = 0
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> None:
        self.server = grpc.aio.server()
        mesh_grpc.add_RouteServiceServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.address = f"127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.server.stop(0)

    async def publish(self, *routes: mesh.Route) -> None:
        self.table = mesh.RouteTable(version=self.table.version + 1, routes=list(routes), cluster_id=self.cluster_id)
        for queue in self.watchers:
            queue.put_nowait(self.table)

    async def WatchRoutes(self, request, context):
        self.watch_calls += 1
        if self.refuse_with:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.refuse_with)
        queue: asyncio.Queue = asyncio.Queue()
        queue.put_nowait(self.table)
        self.watchers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self.watchers.discard(queue)


class ProxyRig:
    """A fake route source and a proxy following it, on one loop thread."""

    def __init__(self, loop: LoopThread, *routes: mesh.Route, **options):
        self.loop = loop
        self.routes = FakeRoutes()
        loop.run(self.routes.start())
        loop.run(self.routes.publish(*routes))
        options.setdefault("metrics_listen", "127.0.0.1:0")
        self.proxy = loop.run(self._start(ProxyOptions(schedulers=[self.routes.address], listen="127.0.0.1:0",
                                                       **options)))
        self.address = self.proxy.address

    async def _start(self, options: ProxyOptions) -> ProxyServer:
        self.proxy = ProxyServer(options)  # grpc.aio objects belong to the loop they are made on
        await self.proxy.start()
        await self.proxy.wait_for_routes(RPC_TIMEOUT_S)
        return self.proxy

    def publish(self, *routes: mesh.Route) -> None:
        """Publish a table and wait until the proxy serves from it."""
        self.loop.run(self._publish(routes))

    async def _publish(self, routes) -> None:
        await self.routes.publish(*routes)
        async with asyncio.timeout(RPC_TIMEOUT_S):
            version = self.routes.table.version
            while getattr(self.proxy.routes, "version", None) != version:  # noqa: ASYNC110 -- no event per version
                await asyncio.sleep(0.005)

    def close(self) -> None:
        self.loop.run(self.proxy.stop(0))
        self.loop.run(self.routes.stop())
