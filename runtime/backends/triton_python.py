"""Triton Python-backend models, unchanged: ``class TritonPythonModel`` in ``model.py``.

Chosen by the python backend when ``model.py`` defines ``TritonPythonModel``
and no ``Predictor`` (nor a ``predictor_class`` parameter). The model sees
what Triton gives it: ``initialize(args)`` with Triton's args dict (the
config as Triton's JSON), ``execute(requests)`` with a list of
``InferenceRequest`` (several when the dynamic batcher groups them),
``finalize()`` on unload, and ``auto_complete_config`` before loading when it
defines one.

Guarantees:
- ``triton_python_backend_utils`` is *bound* in ``sys.modules`` (to
  ``meshserve.runtime.backends.triton_python_backend_utils``) before any
  python model is imported, never installed as a top-level package: a
  top-level package would shadow, or be shadowed by, a real Triton's own copy
  in an environment that has both; a binding lives only in the runtime
  process. A different module already bound under that name is refused.
- ``execute`` must return one ``InferenceResponse`` per request, in order;
  another length or type fails the whole batch with INTERNAL naming the
  model. A response with an error fails only its request, with the gRPC
  status of its ``TritonError`` code and its message. An exception in
  ``execute`` fails the batch with INTERNAL and the exception's message.
- Decoupled models (``model_transaction_policy { decoupled: true }``): the
  responses a model sends through ``get_response_sender()`` stream to the
  client in order until the FINAL flag; execute must return None. The
  instance is free for the next request as soon as ``execute`` returns (as
  in Triton, responses may still be on their way). At most
  ``RESPONSES_AHEAD`` responses wait for the client: ``send`` blocks the
  model's thread beyond that, and returns at once when the client has gone.
  A request whose sender is dropped by the model without FINAL fails with
  INTERNAL instead of hanging.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np

from meshserve.common.errors import Internal, MeshError, error_for_status

from ..config import ConfigError
from ..request import InferRequest
from . import LoadContext
from . import triton_python_backend_utils as pb_utils
from .triton_python_config import auto_complete, initialize_args

log = logging.getLogger(__name__)

MODULE_NAME = "triton_python_backend_utils"
MODEL_CLASS = "TritonPythonModel"
# Responses a decoupled model may be ahead of its client: as many as the stream itself queues
# (servicer.STREAM_RESPONSES_QUEUED), so a slow client holds at most twice that per request.
RESPONSES_AHEAD = 16
# Request parameters Triton consumes itself and does not show in ``parameters()``.
_RESERVED_PARAMETERS = {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout"}
# How often a ``send`` waiting for room checks whether the client went away.
_SEND_POLL_S = 0.1
_ERROR_STATUS = {
    pb_utils.TritonError.UNKNOWN: grpc.StatusCode.UNKNOWN,
    pb_utils.TritonError.INTERNAL: grpc.StatusCode.INTERNAL,
    pb_utils.TritonError.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    pb_utils.TritonError.INVALID_ARG: grpc.StatusCode.INVALID_ARGUMENT,
    pb_utils.TritonError.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    pb_utils.TritonError.UNSUPPORTED: grpc.StatusCode.UNIMPLEMENTED,
    pb_utils.TritonError.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    pb_utils.TritonError.CANCELLED: grpc.StatusCode.CANCELLED,
}
_LOST = object()  # delivered when a decoupled request's sender is dropped without FINAL


def bind_backend_utils() -> None:
    """Make ``import triton_python_backend_utils`` give our module; refuse a different one."""
    bound = sys.modules.setdefault(MODULE_NAME, pb_utils)
    if bound is not pb_utils:
        raise ImportError(
            f"a different '{MODULE_NAME}' ({getattr(bound, '__file__', bound)!r}) is already imported "
            f"in this process; meshserve provides its own to Triton python models"
        )


def defines_triton_model(module) -> bool:
    return isinstance(getattr(module, MODEL_CLASS, None), type)


def _error_of(model: str, error) -> MeshError:
    if isinstance(error, pb_utils.TritonError):
        code = _ERROR_STATUS.get(error.code(), grpc.StatusCode.INTERNAL)
        return error_for_status(code, error.message())
    return Internal(f"model '{model}' answered an error that is not a TritonError: {error!r:.80}")


def _correlation_id(value: object) -> int | str:
    return value if isinstance(value, (int, str)) else 0


def _failure(model: str, err: BaseException | None) -> MeshError:
    if isinstance(err, MeshError):
        return err
    return Internal(f"model '{model}' failed: {type(err).__name__}: {err}")


class TritonPythonInstance:
    """One ``TritonPythonModel`` object; its methods run on the model's executor."""

    streams = False
    executes_requests = True  # the batcher and ServedModel hand it whole requests

    def __init__(self, context: LoadContext, model):
        self._name = context.config.name
        self._version = int(context.version)
        self._executor = context.executor
        self._model = model
        self._output_names = [tensor.name for tensor in context.config.output]

    def _request(self, request: InferRequest,
                 sender: pb_utils.InferenceResponseSender | None) -> pb_utils.InferenceRequest:
        parameters = {key: value for key, value in request.parameters.items()
                      if key not in _RESERVED_PARAMETERS}
        return pb_utils.InferenceRequest(
            inputs=[pb_utils.Tensor(name, array) for name, array in request.inputs.items()],
            request_id=request.id,
            correlation_id=_correlation_id(request.parameters.get("sequence_id", 0)),
            requested_output_names=list(request.requested_outputs or self._output_names),
            model_name=self._name,
            model_version=self._version,
            parameters=json.dumps(parameters, default=lambda v: v.decode("utf-8", "replace")
                                  if isinstance(v, bytes) else str(v)),
            response_sender=sender,
        )

    def _outputs(self, response) -> dict[str, np.ndarray]:
        """A response's tensors by name; its error as the MeshError the client gets."""
        if not isinstance(response, pb_utils.InferenceResponse):
            raise Internal(f"model '{self._name}' returned {type(response).__name__}, not an InferenceResponse")
        if response.has_error():
            raise _error_of(self._name, response.error())
        outputs = {}
        for tensor in response.output_tensors():
            if not isinstance(tensor, pb_utils.Tensor):
                raise Internal(f"model '{self._name}' put a {type(tensor).__name__} among its output tensors")
            outputs[tensor.name()] = tensor.as_numpy()
        return outputs

    def _execute(self, requests: list[pb_utils.InferenceRequest]):
        try:
            return self._model.execute(requests)
        except pb_utils.TritonModelException as err:
            raise Internal(f"model '{self._name}': {err.message()}") from None

    async def execute_requests(self, requests: list[InferRequest]) -> list[dict[str, np.ndarray] | MeshError]:
        """One result per request, in order: its outputs or its error."""
        loop = asyncio.get_running_loop()
        triton_requests = [self._request(request, None) for request in requests]
        responses = await loop.run_in_executor(self._executor, self._execute, triton_requests)
        if not isinstance(responses, (list, tuple)) or len(responses) != len(requests):
            got = f"{len(responses)} responses" if isinstance(responses, (list, tuple)) else \
                type(responses).__name__
            raise Internal(f"model '{self._name}' returned {got} from execute for {len(requests)} requests; "
                           f"it must return one InferenceResponse per request")
        results: list[dict[str, np.ndarray] | MeshError] = []
        for response in responses:
            try:
                results.append(self._outputs(response))
            except MeshError as err:
                results.append(err)
        return results

    async def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise Internal(f"model '{self._name}' is a Triton python model; it executes whole requests")

    async def stream(self, inputs: dict[str, np.ndarray]):
        raise Internal(f"model '{self._name}' is a Triton python model; it streams whole requests")
        yield  # pragma: no cover (makes this an async generator)

    async def stream_request(self, request: InferRequest,
                             release: Callable[[], None]) -> AsyncIterator[dict[str, np.ndarray]]:
        """A decoupled request's responses until FINAL.

        ``release`` (the instance back to its pool) is called exactly once, when
        execute returns, even if the stream ended before: the instance never
        runs two executes at once.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        slots = threading.Semaphore(RESPONSES_AHEAD)
        ended = threading.Event()  # the stream is over (finished, failed or the client went away)
        sent_final = threading.Event()

        def deliver(response, final: bool) -> None:  # on the model's threads
            if ended.is_set():  # the client went away: dropped at once
                return
            while not slots.acquire(timeout=_SEND_POLL_S):
                if ended.is_set():
                    return
            if ended.is_set():
                return
            if final:
                sent_final.set()
            loop.call_soon_threadsafe(queue.put_nowait, (response, final))

        def lost() -> None:  # the sender was dropped; runs in whichever thread dropped it
            if not sent_final.is_set() and not ended.is_set():
                loop.call_soon_threadsafe(queue.put_nowait, (_LOST, True))

        def executed(future: asyncio.Future) -> None:
            release()
            if not future.cancelled() and future.exception() is not None and sent_final.is_set():
                log.warning("model '%s' failed after the final response of request %r: %s",
                            self._name, request.id, future.exception())

        execution: asyncio.Future | None = None
        checked = False
        getter: asyncio.Future | None = None
        try:
            sender = pb_utils.InferenceResponseSender(deliver, ended.is_set)
            weakref.finalize(sender, lost)
            execution = loop.run_in_executor(self._executor, self._execute, [self._request(request, sender)])
            del sender  # only the model may keep it
            execution.add_done_callback(executed)
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter} if checked else {getter, execution},
                                   return_when=asyncio.FIRST_COMPLETED)
                if not checked and execution.done():
                    checked = True
                    # Responses sent before execute failed are queued already (the loop runs its
                    # callbacks in order); with none waiting, the failure is the request's answer.
                    if execution.exception() is not None and not getter.done():
                        raise _failure(self._name, execution.exception())
                    if execution.exception() is None and execution.result() is not None:
                        raise Internal(f"model '{self._name}' is decoupled; its execute must return None "
                                       f"and send responses with the response sender")
                if not getter.done():
                    continue
                response, final = getter.result()
                getter = None
                slots.release()
                if checked and execution.exception() is not None and not final and queue.empty():
                    if response is not None and response is not _LOST:
                        yield self._outputs(response)
                    raise _failure(self._name, execution.exception())
                if response is _LOST:
                    raise Internal(f"model '{self._name}' dropped the response sender of request "
                                   f"{request.id!r} without sending TRITONSERVER_RESPONSE_COMPLETE_FINAL")
                if response is not None:
                    yield self._outputs(response)
                if final:
                    return
        finally:
            ended.set()
            if getter is not None:
                getter.cancel()
            if execution is None:
                release()

    async def close(self) -> None:
        finalize = getattr(self._model, "finalize", None)
        if callable(finalize):
            await asyncio.get_running_loop().run_in_executor(self._executor, finalize)


def _create(context: LoadContext, cls, index: int):
    model = cls()
    initialize = getattr(model, "initialize", None)
    if callable(initialize):
        try:
            initialize(initialize_args(context, index))
        except pb_utils.TritonModelException as err:
            raise ConfigError(f"model '{context.config.name}' refused to initialize: {err.message()}") from None
    return model


async def load_instances(context: LoadContext, count: int, module) -> list[TritonPythonInstance]:
    """``count`` instances of the module's ``TritonPythonModel``, each initialized with Triton's args."""
    cls = getattr(module, MODEL_CLASS)
    if not callable(getattr(cls, "execute", None)):
        raise ImportError(f"{context.version_dir}/model.py: class {MODEL_CLASS} has no execute method")
    loop = asyncio.get_running_loop()
    if callable(getattr(cls, "auto_complete_config", None)):
        await loop.run_in_executor(context.executor, auto_complete, context, cls)
    instances = []
    for index in range(count):
        model = await loop.run_in_executor(context.executor, _create, context, cls, index)
        instances.append(TritonPythonInstance(context, model))
    return instances
