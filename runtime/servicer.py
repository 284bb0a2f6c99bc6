"""``inference.GRPCInferenceService``: a thin layer over the repository and its models.

Handlers decode, call the data plane, encode. Errors are raised as the
project's error types and turned into statuses by ``StatusInterceptor``.

Tracing (``runtime.telemetry``): when an SDK tracer provider is installed
before the servicer is built, every ModelInfer request and every request of
a ModelStreamInfer stream gets a SERVER span continuing the caller's W3C
``traceparent`` metadata, with queue and execute children and, on streams,
one ``response`` event per response. Otherwise no span work is done at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata

import grpc

from meshserve.common.errors import InvalidArgument, MeshError, NotFound, Unimplemented, drop_tracebacks, status_message
from meshserve.common.model_names import plain_model_name
from meshserve.common.telemetry import RequestTrace, extract_context, runtime_tracer
from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc

from .in_flight import InFlight
from .model_control import ModelControl
from .repository import READY, ModelRepository
from .request import EMPTY_FINAL_PARAMETER, FINAL_RESPONSE_PARAMETER, decode_request, encode_response
from .shared_memory import SharedMemoryRegistry
from .shm_scope import scope_of

SERVER_NAME = "meshserve"
UNLOAD_DEPENDENTS = "unload_dependents"   # Triton's RepositoryModelUnload parameter
# What one ModelStreamInfer stream may hold at once. 64 requests in flight let one stream fill
# a batch of max_batch_size 64 (the examples' largest) or keep a perf_analyzer-style pipeline
# busy; with the queued responses they bound a stream that is never read to 80 messages, a few
# copies each (about 250 MB with 1 MB messages), where it held every request it was sent.
STREAM_REQUESTS_IN_FLIGHT = 64
STREAM_RESPONSES_QUEUED = 16
# Only what this runtime really implements (Triton's load generator reads this).
SHM_EXTENSION = "system_shared_memory"   # not listed when --shared-memory none
EXTENSIONS = ["classification", "model_repository", "model_configuration", "schedule_policy",
              "statistics", "parameters", SHM_EXTENSION]


def _server_version() -> str:
    try:
        return metadata.version("meshserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _final_flag(value: bool) -> dict[str, pb.InferParameter]:
    return {FINAL_RESPONSE_PARAMETER: pb.InferParameter(bool_param=value)}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Every model name from a client is checked (``plain_model_name``) before it is looked up;
    load and unload go through ``model_control``, and ``on_models_changed`` runs after either."""

    def __init__(self, repository: ModelRepository, model_control: ModelControl | None = None,
                 on_models_changed: Callable[[], Awaitable[None]] | None = None,
                 shared_memory: SharedMemoryRegistry | None = None):
        self.repository = repository
        self.model_control = model_control if model_control is not None else ModelControl()
        self._on_models_changed = on_models_changed
        self.ready = False  # false while loading and while draining
        self._version = _server_version()
        self._tracer = runtime_tracer()  # None: tracing off, no span work on the hot path
        # Regions live as long as the servicer, each visible only to its client (runtime/shm_scope.py).
        self.shared_memory = shared_memory if shared_memory is not None else SharedMemoryRegistry()
        self.in_flight = InFlight()  # what a drain waits for (runtime/in_flight.py)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready)

    async def ModelReady(self, request, context):
        plain_model_name(request.name)
        try:
            self.repository.get(request.name, request.version)
        except MeshError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.ready)

    async def ServerMetadata(self, request, context):
        extensions = EXTENSIONS if self.shared_memory.enabled else [e for e in EXTENSIONS if e != SHM_EXTENSION]
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=extensions)

    async def ModelMetadata(self, request, context):
        model = self.repository.get(plain_model_name(request.name), request.version)
        return model.metadata(self.repository.versions(request.name))

    async def ModelConfig(self, request, context):
        model = self.repository.get(plain_model_name(request.name), request.version)
        return pb.ModelConfigResponse(config=model.config)

    async def ModelStatistics(self, request, context):
        if request.name:
            models = [self.repository.get(plain_model_name(request.name), request.version)]
        elif request.version:
            raise InvalidArgument("a version was given without a model name")
        else:
            models = self.repository.ready_models()
        return pb.ModelStatisticsResponse(model_stats=[model.stats.to_proto() for model in models])

    async def ModelInfer(self, request, context):
        with self.in_flight.call(context):   # until its response is sent
            if self._tracer is None:
                return await self._infer(request, None, context)
            trace = RequestTrace(self._tracer, "ModelInfer", request.model_name, request.id,
                                 extract_context(context.invocation_metadata()))
            try:
                response = await self._infer(request, trace, context)
            except BaseException as err:
                trace.end(err)
                raise
            trace.end()
            return response

    def _regions_of(self, context):
        """The shared memory regions the calling client may name; none when there are none at all."""
        return self.shared_memory.client(scope_of(context).owner) if len(self.shared_memory) else None

    async def _infer(self, request: pb.ModelInferRequest, trace: RequestTrace | None,
                     context=None) -> pb.ModelInferResponse:
        model = self.repository.get(plain_model_name(request.model_name), request.model_version)
        if trace is not None:
            trace.model_version(model.version)
        infer_request = decode_request(request, model.signature, self._regions_of(context))
        outputs = await model.infer(infer_request, trace)
        return encode_response(model.name, model.version, request.id, outputs, model.signature,
                               infer_request.requested_outputs, model.labels,
                               output_regions=infer_request.output_regions)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> None:
        """Requests on one stream run concurrently; each one's responses keep their order.

        Every response carries ``triton_final_response``. With
        ``triton_enable_empty_final_response`` responses go out as soon as
        they are produced and an empty final response closes the request;
        without it the last response itself is marked final (held back until
        the next one exists). A failing request answers ``error_message``
        as "STATUS_CODE: message" (a stream has no per-request status) and
        the stream goes on; a message that cannot be decoded ends the stream
        with INVALID_ARGUMENT.

        Bounded: at most ``STREAM_REQUESTS_IN_FLIGHT`` requests are read and
        not yet fully answered, and at most ``STREAM_RESPONSES_QUEUED``
        responses wait to be sent. A client that stops reading therefore
        stops this stream reading its requests, and HTTP/2 flow control holds
        the rest in the client. When the stream ends every request task is
        cancelled and nothing of it is kept.
        """
        responses: asyncio.Queue = asyncio.Queue(maxsize=STREAM_RESPONSES_QUEUED)
        slots = asyncio.Semaphore(STREAM_REQUESTS_IN_FLIGHT)
        running: set[asyncio.Task] = set()
        tracer = self._tracer
        parent = None if tracer is None else extract_context(context.invocation_metadata())

        async def answer(request: pb.ModelInferRequest) -> None:
            trace = None if tracer is None or parent is None else RequestTrace(
                tracer, "ModelStreamInfer", request.model_name, request.id, parent)
            error: BaseException | None = None
            try:
                await self._stream_one(request, responses, trace, context)
            except MeshError as err:
                error = err
                await responses.put(pb.ModelStreamInferResponse(
                    error_message=status_message(f"{err.code.name}: {err.message}"),
                    infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
                ))
            except BaseException as err:
                error = err
                raise
            finally:
                if trace is not None:
                    trace.end(error)
                if isinstance(error, MeshError):  # answered: its frames would keep the request
                    drop_tracebacks(error)
                error = None  # this frame holding its own exception would be a cycle
                slots.release()

        async def read_requests() -> None:
            requests = request_iterator.__aiter__()
            while True:
                await slots.acquire()  # waits while the stream holds its limit
                try:
                    request = await requests.__anext__()
                except StopAsyncIteration:
                    break
                task = asyncio.create_task(answer(request))
                del request  # the task holds it, for as long as it needs it
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.wait(set(running))

        async def read_then_end() -> None:
            """Reads and answers every request, then ends ``responses`` (also when reading fails)."""
            try:
                await read_requests()
            except asyncio.CancelledError:
                raise
            except BaseException:
                await responses.put(None)  # the stream ends with this error (``await reader``)
                raise
            await responses.put(None)

        with self.in_flight.call(context):   # the whole stream: a drain lets it finish
            reader = asyncio.create_task(read_then_end())
            try:  # context.write, not yield: a write to a client that is gone fails here, and this
                # finally runs at once (a generator left at its yield would wait for the gc)
                while (response := await responses.get()) is not None:
                    try:
                        await context.write(response)
                    except grpc.aio.InternalError:  # the call is over: the client cancelled or left
                        return
                response = None
                await reader
            finally:
                reader.cancel()
                for task in list(running):
                    task.cancel()

    async def _stream_one(self, request: pb.ModelInferRequest, responses: asyncio.Queue,
                          trace: RequestTrace | None, context=None) -> None:
        model = self.repository.get(plain_model_name(request.model_name), request.model_version)
        if trace is not None:
            trace.model_version(model.version)
        infer_request = decode_request(request, model.signature, self._regions_of(context))
        empty_final = bool(infer_request.parameters.get(EMPTY_FINAL_PARAMETER)) and model.decoupled

        def response(outputs, final: bool) -> pb.ModelStreamInferResponse:
            if trace is not None:
                trace.response(final)
            return pb.ModelStreamInferResponse(infer_response=encode_response(
                model.name, model.version, request.id, outputs, model.signature,
                infer_request.requested_outputs, model.labels, _final_flag(final),
                output_regions=infer_request.output_regions))

        held = None
        try:
            async for outputs in model.stream(infer_request, trace):
                if empty_final:
                    await responses.put(response(outputs, False))
                    continue
                if held is not None:
                    await responses.put(response(held, False))
                held = outputs
        except MeshError:
            if held is not None:  # produced before the failure: the client gets it, then the error
                await responses.put(response(held, False))
            raise
        if empty_final or held is None:
            await responses.put(response({}, True))
        else:
            await responses.put(response(held, True))

    async def RepositoryIndex(self, request, context):
        if request.repository_name:
            raise NotFound(f"unknown repository '{request.repository_name}'; this server has one, unnamed")
        response = pb.RepositoryIndexResponse()
        for name, version, state, reason in self.repository.index():
            if request.ready and state != READY:
                continue
            response.models.add(name=name, version=version, state=state, reason=reason)
        return response

    def _check_repository_request(self, request, accepted: tuple[str, ...] = ()) -> None:
        if request.repository_name:
            raise NotFound(f"unknown repository '{request.repository_name}'; this server has one, unnamed")
        refused = sorted(set(request.parameters) - set(accepted))
        if refused:
            raise InvalidArgument(
                f"repository parameters ({', '.join(refused)}) are not supported; "
                f"change the files in the repository instead"
            )

    async def RepositoryModelLoad(self, request, context):
        self._check_repository_request(request)
        self.model_control.check("load", plain_model_name(request.model_name))
        try:
            await self.repository.load(request.model_name)
        finally:
            await self._models_changed()
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        # tritonclient sends `unload_dependents` (a bool) on every unload, true or false.
        self._check_repository_request(request, accepted=(UNLOAD_DEPENDENTS,))
        name = plain_model_name(request.model_name)
        self.model_control.check("unload", name)
        names = [name]
        if UNLOAD_DEPENDENTS in request.parameters:
            parameter = request.parameters[UNLOAD_DEPENDENTS]
            if parameter.WhichOneof("parameter_choice") != "bool_param":
                raise InvalidArgument(f"parameter '{UNLOAD_DEPENDENTS}' must be a bool")
            if parameter.bool_param:
                names += self.repository.dependents(name)
        # The dependents go without a check of their own: they were loaded for the ensemble, and load with it.
        try:
            for each in names:
                await self.repository.unload(each)
        finally:
            await self._models_changed()
        return pb.RepositoryModelUnloadResponse()

    async def _models_changed(self) -> None:
        if self._on_models_changed is not None:
            await self._on_models_changed()

    async def _unimplemented(self, what: str):
        raise Unimplemented(f"{what} is not implemented by meshserve's runtime yet")

    async def SystemSharedMemoryStatus(self, request, context):
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self.shared_memory.status(request.name, owner=scope_of(context).owner):
            response.regions[region.name].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size))
        return response

    async def SystemSharedMemoryRegister(self, request, context):
        scope = scope_of(context)
        self.shared_memory.register(request.name, request.key, request.offset, request.byte_size,
                                    owner=scope.owner, connection=scope.connection)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request, context):
        self.shared_memory.unregister(request.name, owner=scope_of(context).owner)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request, context):
        # Needs a CUDA IPC handle opened in this process; system shared memory works on any host.
        await self._unimplemented("CUDA shared memory")

    async def CudaSharedMemoryRegister(self, request, context):
        await self._unimplemented("CUDA shared memory")

    async def CudaSharedMemoryUnregister(self, request, context):
        await self._unimplemented("CUDA shared memory")

    async def TraceSetting(self, request, context):
        await self._unimplemented("TraceSetting")

    async def LogSettings(self, request, context):
        await self._unimplemented("LogSettings")
