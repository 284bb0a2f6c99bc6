"""A Triton ensemble served as one model: its steps run as a DAG of asyncio tasks.

Guarantees:
- A step starts as soon as every tensor it reads exists (an ensemble input,
  or an output of a finished step); independent steps run concurrently.
- Between steps served by this runtime, tensors stay numpy arrays in this
  process: no protobuf, no copy, no network. Each step model keeps its own
  batcher and statistics (its requests may batch with direct clients').
- A step model named by ``--remote-model`` is called over gRPC instead
  (``ensemble_remote``); nothing else changes.
- A failing step fails only its own request, with the step's status code and
  "ensemble 'E' step N (model 'M') failed: ..."; the steps still running for
  that request are cancelled; the next request runs normally.
- A streaming (decoupled) step, which must feed only ensemble outputs, makes
  the ensemble stream: once every other step is done, each of its responses
  is one ensemble response (the first one also carries the other steps'
  ensemble outputs).
- The ensemble answers ModelMetadata/ModelConfig/ModelStatistics as itself;
  a step model is resolved per request, so reloading a step model is seen at
  once (an unloaded step model fails requests, naming the step).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import numpy as np

from meshserve.common import tensors
from meshserve.common.errors import FailedPrecondition, Internal, InvalidArgument, MeshError, error_for_status
from meshserve.common.telemetry import RequestTrace
from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import model_config_pb2 as mc

from .ensemble_graph import EnsemblePlan, Step, StepModelSpec, plan_ensemble
from .ensemble_remote import RemoteModels, RemoteStep
from .ensemble_trace import StepTrace
from .model import ServedModel, model_metadata
from .request import InferRequest, ModelSignature
from .statistics import ModelStatisticsRecorder
from .tensor_spec import TensorSpec

log = logging.getLogger(__name__)

# (name, version) -> the ready local model; raises NotFound/Unavailable like ModelRepository.get.
Resolve = Callable[[str, str], "ServedModel | EnsembleModel"]


class LocalStep:
    """Runs one step on a model of this runtime, passing numpy arrays in process."""

    where = "local"

    def __init__(self, resolve: Resolve, model: str, version: str):
        self._resolve = resolve
        self.model = model
        self.version = version

    def _request(self, model, inputs: dict[str, np.ndarray], parent: InferRequest) -> InferRequest:
        signature: ModelSignature = model.signature
        batch_size = None
        for name, array in inputs.items():
            spec = signature.inputs[name]
            try:
                datatype = tensors.datatype_of(array)
            except ValueError as err:
                raise InvalidArgument(f"input '{name}': {err}") from None
            if datatype != spec.datatype:
                raise InvalidArgument(f"input '{name}' has datatype {datatype} but model '{model.name}' "
                                      f"expects {spec.datatype}")
            spec.check_shape(model.name, list(array.shape), signature.max_batch_size)
            if signature.max_batch_size > 0:
                if batch_size is None:
                    batch_size = array.shape[0]
                elif array.shape[0] != batch_size:
                    raise InvalidArgument(f"input '{name}' has batch size {array.shape[0]} but other "
                                          f"inputs have {batch_size}")
        for name, spec in signature.inputs.items():
            if name not in inputs and not spec.optional:
                raise InvalidArgument(f"missing input '{name}' for model '{model.name}'")
        return InferRequest(id=parent.id, inputs=inputs, batch_size=batch_size or 1, requested_outputs=None,
                            parameters=parent.parameters, deadline=parent.deadline)

    async def infer(self, inputs, request: InferRequest, trace) -> dict[str, np.ndarray]:
        model = self._resolve(self.model, self.version)
        if trace is not None:
            trace.model_version(model.version)
        return await model.infer(self._request(model, inputs, request), trace)

    async def stream(self, inputs, request: InferRequest, trace) -> AsyncIterator[dict[str, np.ndarray]]:
        model = self._resolve(self.model, self.version)
        if trace is not None:
            trace.model_version(model.version)
        async for outputs in model.stream(self._request(model, inputs, request), trace):
            yield outputs


def step_error(ensemble: str, step: Step, err: MeshError, where: str = "local") -> MeshError:
    at = "" if where == "local" else f" at {where}"
    return error_for_status(err.code, f"ensemble '{ensemble}' {step.label}{at} failed: {err.message}")


class EnsembleModel:
    """A loaded ensemble; duck-types ``ServedModel`` for the servicer and the repository."""

    def __init__(self, config: mc.ModelConfig, version: str, plan: EnsemblePlan, targets: dict[int, LocalStep | RemoteStep]):
        self.config = config
        self.name = config.name
        self.version = version
        self.plan = plan
        self.targets = targets  # step number -> LocalStep | RemoteStep
        self.warnings = list(plan.warnings)
        self.decoupled = plan.streaming is not None or config.model_transaction_policy.decoupled
        if self.decoupled:
            self.config.model_transaction_policy.decoupled = True  # what clients read to call it
        self.labels: dict[str, list[str]] = {}
        self.signature = ModelSignature(
            name=config.name,
            inputs={t.name: TensorSpec.from_config(t) for t in config.input},
            outputs={t.name: TensorSpec.from_config(t) for t in config.output},
            max_batch_size=config.max_batch_size,
        )
        self.stats = ModelStatisticsRecorder(config.name, version)
        self._batched = [step for step in plan.order if step is not plan.streaming]

    @classmethod
    async def load(cls, config: mc.ModelConfig, version: str, resolve: Resolve,
                   remote: RemoteModels, local_config: Callable[[str, str], mc.ModelConfig]) -> EnsembleModel:
        """Resolve every step's model (local: ``local_config``; remote: its replica) and check the graph.

        ``local_config(name, version)`` returns the config of a loaded local
        model or raises naming why it cannot (not in the repository, not ready).
        """
        config = mc.ModelConfig.FromString(config.SerializeToString())
        specs: dict[int, StepModelSpec] = {}
        targets: dict[int, LocalStep | RemoteStep] = {}
        for index, step in enumerate(config.ensemble_scheduling.step):
            number = index + 1
            version_text = "" if step.model_version <= 0 else str(step.model_version)
            label = f"ensemble '{config.name}' step {number} (model '{step.model_name}')"
            if step.model_name in remote:
                address = remote.address(step.model_name)
                try:
                    step_config = await remote.config(step.model_name, version_text)
                except MeshError as err:
                    raise error_for_status(
                        err.code, f"{label}: cannot read its config from the remote replica at {address}: "
                                  f"{err.message}") from err
                targets[number] = RemoteStep(remote, step.model_name, version_text)
            else:
                try:
                    step_config = local_config(step.model_name, version_text)
                except MeshError as err:
                    raise error_for_status(err.code, f"{label}: {err.message}") from err
                targets[number] = LocalStep(resolve, step.model_name, version_text)
            specs[number] = StepModelSpec.from_config(step_config)
        plan = plan_ensemble(config, specs)
        for warning in plan.warnings:
            log.warning("%s", warning)
        return cls(config, version, plan, targets)

    # -- execution ------------------------------------------------------------

    async def _run_step(self, step: Step, inputs: dict[str, np.ndarray], request: InferRequest,
                        trace: RequestTrace | None) -> dict[str, np.ndarray]:
        target = self.targets[step.number]
        step_trace = None if trace is None else StepTrace(
            trace, step.number, step.model, None if target.where == "local" else target.where)
        error: BaseException | None = None
        try:
            outputs = await target.infer(inputs, request, step_trace)
            missing = [name for name in step.output_map if name not in outputs]
            if missing:
                raise Internal(f"model '{step.model}' returned no output {', '.join(map(repr, missing))}")
            return outputs
        except MeshError as err:
            error = step_error(self.name, step, err, target.where)
            raise error from err
        except Exception as err:  # a bug on our side; still this request only
            log.exception("ensemble '%s' %s", self.name, step.label)
            error = Internal(f"ensemble '{self.name}' {step.label} failed: {type(err).__name__}: {err}")
            raise error from err
        except BaseException as err:  # cancelled: the request or a sibling step failed
            error = err
            raise
        finally:
            if step_trace is not None:
                step_trace.end(error)

    async def _run_dag(self, request: InferRequest, trace: RequestTrace | None) -> dict[str, np.ndarray]:
        """Every non-streaming step, each started when its inputs exist; returns all tensors."""
        tensors_ = dict(request.inputs)
        absent = {name for name in self.signature.inputs if name not in tensors_}  # optional, not sent
        waiting = list(self._batched)
        running: dict[asyncio.Task, Step] = {}

        def start_ready() -> None:
            for step in list(waiting):
                if all(t in tensors_ or t in absent for t in step.input_map.values()):
                    waiting.remove(step)
                    inputs = {name: tensors_[t] for name, t in step.input_map.items() if t in tensors_}
                    running[asyncio.create_task(self._run_step(step, inputs, request, trace))] = step

        start_ready()
        try:
            while running:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    step = running.pop(task)
                    outputs = task.result()  # a failed step raises its named error here
                    for name, tensor in step.output_map.items():
                        tensors_[tensor] = outputs[name]
                start_ready()
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        if waiting:  # cannot happen for a validated plan; a guard, not a path
            raise Internal(f"ensemble '{self.name}': {', '.join(s.label for s in waiting)} never got inputs")
        return tensors_

    def _outputs(self, tensors_: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: tensors_[name] for name in self.signature.outputs if name in tensors_}

    async def infer(self, request: InferRequest, trace: RequestTrace | None = None) -> dict[str, np.ndarray]:
        if self.decoupled:
            raise FailedPrecondition(
                f"ensemble '{self.name}' streams (a step is decoupled); call ModelStreamInfer")
        ok = False
        try:
            outputs = self._outputs(await self._run_dag(request, trace))
            ok = True
            return outputs
        finally:
            self._record(request, ok)

    async def stream(self, request: InferRequest,
                     trace: RequestTrace | None = None) -> AsyncIterator[dict[str, np.ndarray]]:
        if not self.decoupled:
            yield await self.infer(request, trace)
            return
        ok = False
        try:
            tensors_ = await self._run_dag(request, trace)
            step = self.plan.streaming
            if step is None:  # declared decoupled, no streaming step: one response
                yield self._outputs(tensors_)
                ok = True
                return
            first = self._outputs(tensors_)
            async for outputs in self._stream_step(step, tensors_, request, trace):
                first.update({tensor: outputs[name] for name, tensor in step.output_map.items() if name in outputs
                              and tensor in self.signature.outputs})
                yield first
                first = {}
            ok = True
        finally:
            self._record(request, ok)

    async def _stream_step(self, step: Step, tensors_, request, trace) -> AsyncIterator[dict[str, np.ndarray]]:
        target = self.targets[step.number]
        inputs = {name: tensors_[t] for name, t in step.input_map.items() if t in tensors_}
        step_trace = None if trace is None else StepTrace(
            trace, step.number, step.model, None if target.where == "local" else target.where)
        error: BaseException | None = None
        try:
            async for outputs in target.stream(inputs, request, step_trace):
                yield outputs
        except MeshError as err:
            error = step_error(self.name, step, err, target.where)
            raise error from err
        except Exception as err:
            log.exception("ensemble '%s' %s", self.name, step.label)
            error = Internal(f"ensemble '{self.name}' {step.label} failed: {type(err).__name__}: {err}")
            raise error from err
        except BaseException as err:
            error = err
            raise
        finally:
            if step_trace is not None:
                step_trace.end(error)

    def _record(self, request: InferRequest, ok: bool) -> None:
        elapsed = time.perf_counter_ns() - request.arrival_ns
        if ok:  # the whole pipeline is the ensemble's one "execution"; each step counts its own
            self.stats.record_batch(1, request.batch_size, 0, elapsed, 0)
        self.stats.record_request(ok, elapsed)

    # -- model surface ----------------------------------------------------------

    def metadata(self, versions: list[str]) -> pb.ModelMetadataResponse:
        return model_metadata(self.config, self.signature, versions)

    async def close(self) -> None:
        """Nothing of its own to drain: its steps' models drain their own requests."""
