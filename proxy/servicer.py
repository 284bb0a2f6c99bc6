"""``inference.GRPCInferenceService`` at the proxy: forwarded calls and the proxy's own answers.

- ModelInfer, ModelMetadata, ModelConfig: forwarded as raw bytes to one
  replica of the model (``UnaryForwarder``); ModelStreamInfer: pinned
  streams (``StreamForwarder``). These are registered with identity
  serializers, so tensors are never decoded here.
- ServerLive: always; ServerReady: once a route table is held; ModelReady:
  the model (version) has a replica in rotation; ServerMetadata: the
  proxy's; RepositoryIndex: the models of the table; ModelStatistics:
  every replica's statistics of the model(s), summed.
- Repository load/unload and shared memory are refused, FAILED_PRECONDITION
  (``proxy.host_local``); trace and log settings concern one server:
  UNIMPLEMENTED here, naming what to call instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from importlib import metadata

import grpc

from meshserve.common.errors import InvalidArgument, MeshError, NotFound, Unavailable, Unimplemented, error_for_status
from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc

from .endpoints import SERVICE_NAME, Endpoint
from .forwarder import UnaryForwarder, Upstreams
from .host_local import model_control_refused, shared_memory_refused
from .routes import RouteTable
from .statistics import aggregate
from .streams import StreamForwarder
from .tracing import forwarded_metadata

SERVER_NAME = "meshserve"
EXTENSIONS = ["classification", "model_repository", "model_configuration", "schedule_policy",
              "statistics", "parameters"]
# Bounds a statistics fan-out when the client set no deadline.
STATISTICS_TIMEOUT_S = 10.0
RAW_UNARY = ("ModelInfer", "ModelMetadata", "ModelConfig")
RAW_STREAM = ("ModelStreamInfer",)


def _version() -> str:
    try:
        return metadata.version("meshserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class ProxyServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, upstreams: Upstreams, has_table: Callable[[], bool]):
        self.up = upstreams
        self.has_table = has_table
        self._version = _version()

    def _table(self) -> RouteTable:
        table = self.up.table()
        if table is None:
            raise Unavailable("the proxy has no route table yet (no scheduler reached)")
        return table

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.has_table())

    async def ModelReady(self, request, context):
        table = self.up.table()
        if table is None:
            return pb.ModelReadyResponse(ready=False)
        ready = any(
            (endpoint := self.up.pool.get(info.address)) is not None and endpoint.healthy
            for route in table.routes_for(request.name, request.version) for info in route.endpoints
        )
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=EXTENSIONS)

    async def RepositoryIndex(self, request, context):
        if request.repository_name:
            raise NotFound(f"unknown repository '{request.repository_name}'; the proxy has one, unnamed")
        table = self._table()
        response = pb.RepositoryIndexResponse()
        seen = set()
        for route in table.routes:
            key = (route.model, route.version)
            if key in seen:
                continue
            seen.add(key)
            ready = any(r.endpoints for r in table.routes if (r.model, r.version) == key)
            if request.ready and not ready:
                continue
            response.models.add(name=route.model, version=route.version,
                                state="READY" if ready else "UNAVAILABLE",
                                reason="" if ready else "no ready replica")
        return response

    async def ModelStatistics(self, request, context):
        if request.name:
            routes = self.up.routes(request.name, request.version)
            addresses = {e.address for route in routes for e in route.endpoints}
        elif request.version:
            raise InvalidArgument("a version was given without a model name")
        else:
            addresses = set(self._table().endpoints())
        endpoints = [e for a in sorted(addresses) if (e := self.up.pool.get(a)) is not None]
        remaining = context.time_remaining()
        timeout = STATISTICS_TIMEOUT_S if remaining is None else min(remaining, STATISTICS_TIMEOUT_S)
        outgoing = tuple(forwarded_metadata(context.invocation_metadata()))
        answers = await asyncio.gather(*(_statistics(e, request, timeout, outgoing) for e in endpoints),
                                       return_exceptions=True)
        responses = [a for a in answers if isinstance(a, pb.ModelStatisticsResponse)]
        if not responses:
            errors = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
            if errors:
                raise error_for_status(errors[0].code(), errors[0].details() or "")
            if request.name:
                raise Unavailable(f"no replica of model '{request.name}' is reachable")
        return aggregate(responses)

    # -- one server's business, not the proxy's --------------------------------

    async def _not_here(self, what: str):
        raise Unimplemented(f"{what} is not served by the proxy; call a replica (or use scheduler ctl)")

    async def RepositoryModelLoad(self, request, context):
        raise model_control_refused("RepositoryModelLoad")

    async def RepositoryModelUnload(self, request, context):
        raise model_control_refused("RepositoryModelUnload")

    async def SystemSharedMemoryStatus(self, request, context):
        raise shared_memory_refused("SystemSharedMemoryStatus")

    async def SystemSharedMemoryRegister(self, request, context):
        raise shared_memory_refused("SystemSharedMemoryRegister")

    async def SystemSharedMemoryUnregister(self, request, context):
        raise shared_memory_refused("SystemSharedMemoryUnregister")

    async def CudaSharedMemoryStatus(self, request, context):
        raise shared_memory_refused("CudaSharedMemoryStatus")

    async def CudaSharedMemoryRegister(self, request, context):
        raise shared_memory_refused("CudaSharedMemoryRegister")

    async def CudaSharedMemoryUnregister(self, request, context):
        raise shared_memory_refused("CudaSharedMemoryUnregister")

    async def TraceSetting(self, request, context):
        await self._not_here("TraceSetting")

    async def LogSettings(self, request, context):
        await self._not_here("LogSettings")


async def _statistics(endpoint: Endpoint, request, timeout: float, outgoing) -> pb.ModelStatisticsResponse:
    call = endpoint.channel.unary_unary(
        f"/{SERVICE_NAME}/ModelStatistics",
        request_serializer=pb.ModelStatisticsRequest.SerializeToString,
        response_deserializer=pb.ModelStatisticsResponse.FromString,
    )
    return await call(request, timeout=timeout, metadata=outgoing)


def service_handler(servicer: ProxyServicer, unary: UnaryForwarder,
                    streams: StreamForwarder) -> grpc.GenericRpcHandler:
    """Every RPC of the service: raw-bytes handlers for the forwarded ones, typed for the rest."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        name = method.name
        if name in RAW_UNARY:
            handlers[name] = grpc.unary_unary_rpc_method_handler(_raw_unary(unary, name, name == "ModelInfer"))
        elif name in RAW_STREAM:
            handlers[name] = grpc.stream_stream_rpc_method_handler(streams.forward)
        else:
            request_type = getattr(pb, method.input_type.name)
            response_type = getattr(pb, method.output_type.name)
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                getattr(servicer, name),
                request_deserializer=request_type.FromString,
                response_serializer=response_type.SerializeToString,
            )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _raw_unary(unary: UnaryForwarder, method: str, count: bool):
    """A forwarded call's handler: a refusal (``MeshError``) becomes its status here, with no
    exception leaving the handler.

    grpc.aio keeps an aborted call's exception on the call's state, in a
    reference cycle with the frames it crossed; those frames hold the request
    bytes (up to the message limit), which only the garbage collector would
    then free, late. Setting the status and returning keeps no frame: the
    request is freed when the call ends.
    """
    async def handle(request: bytes, context):
        try:
            return await unary.forward(method, request, context, count=count)
        except MeshError as err:
            context.set_code(err.code)
            context.set_details(err.message)
            err.__traceback__ = None
        return b""
    return handle



