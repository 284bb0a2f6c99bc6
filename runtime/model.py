"""One served version of a model: its instances, its batcher, its statistics.

``ServedModel`` is the transport-free data plane of a model: it takes a
validated ``InferRequest`` and returns numpy outputs (``infer``) or an async
iterator of them (``stream``). Decoupled models stream and never batch;
every other model goes through the batcher, with batching on or off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pathlib
import time
from collections.abc import AsyncIterator

import numpy as np

from meshserve.common import model_config as config_rules
from meshserve.common.errors import FailedPrecondition, Internal, MeshError
from meshserve.common.telemetry import RequestTrace
from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import model_config_pb2 as mc

from .backends import LoadContext, load_instances
from .batcher import Batcher, BatchingPolicy
from .devices import instance_devices
from .instance_pool import InstancePool
from .request import InferRequest, ModelSignature
from .statistics import ModelStatisticsRecorder
from .tensor_spec import TensorSpec

log = logging.getLogger(__name__)


def batching_policy(config: mc.ModelConfig) -> BatchingPolicy:
    batching = config.dynamic_batching
    enabled = config.HasField("dynamic_batching")
    preferred = max(batching.preferred_batch_size, default=config.max_batch_size)
    return BatchingPolicy(
        enabled=enabled,
        max_batch_size=config.max_batch_size,
        preferred_size=preferred if enabled else 1,
        max_queue_delay_s=batching.max_queue_delay_microseconds / 1e6,
        max_queue_size=batching.default_queue_policy.max_queue_size,
    )


def _read_labels(model_dir: pathlib.Path, config: mc.ModelConfig) -> dict[str, list[str]]:
    labels = {}
    for output in config.output:
        if output.label_filename:
            path = model_dir / output.label_filename
            if not path.exists():
                raise config_rules.ConfigError(
                    f"{model_dir / config_rules.CONFIG_FILE}: output '{output.name}' names "
                    f"label_filename '{output.label_filename}', which does not exist"
                )
            labels[output.name] = path.read_text().splitlines()
    return labels


def model_metadata(config: mc.ModelConfig, signature: ModelSignature,
                   versions: list[str]) -> pb.ModelMetadataResponse:
    """ModelMetadata of a model (served or ensemble): its tensors with the batch axis as -1."""
    response = pb.ModelMetadataResponse(
        name=config.name, versions=versions, platform=config.platform or config.backend
    )
    for specs, target in ((signature.inputs, response.inputs), (signature.outputs, response.outputs)):
        for spec in specs.values():
            target.add(name=spec.name, datatype=spec.datatype, shape=spec.wire_shape(config.max_batch_size))
    return response


class ServedModel:
    """A loaded model version. Create with ``await ServedModel.load(...)``."""

    def __init__(self, config: mc.ModelConfig, version: str, instances: list,
                 executor: concurrent.futures.ThreadPoolExecutor, labels: dict[str, list[str]]):
        self.config = config
        self.name = config.name
        self.version = version
        self.decoupled = config_rules.is_decoupled(config)
        self.labels = labels
        self.signature = ModelSignature(
            name=config.name,
            inputs={t.name: TensorSpec.from_config(t) for t in config.input},
            outputs={t.name: TensorSpec.from_config(t) for t in config.output},
            max_batch_size=config.max_batch_size,
            default_timeout_us=config.dynamic_batching.default_queue_policy.default_timeout_microseconds,
        )
        self.stats = ModelStatisticsRecorder(config.name, version)
        self._executor = executor
        self._pool = InstancePool(instances)
        self._streams = 0
        self.pending_requests = 0   # ModelInfer calls queued or executing (nv_inference_pending_request_count)
        self._no_streams = asyncio.Event()
        self._no_streams.set()
        self._batcher = None if self.decoupled else Batcher(
            config.name, self._pool, batching_policy(config), self.stats
        )

    @classmethod
    async def load(cls, model_dir: pathlib.Path, config: mc.ModelConfig, version: str) -> ServedModel:
        """Load one version; raises with the backend's message if it cannot."""
        config = mc.ModelConfig.FromString(config.SerializeToString())  # each version owns its config
        count = config_rules.instance_count(config)
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=count, thread_name_prefix=f"model-{config.name}"
        )
        try:
            devices = instance_devices(config, count)
            context = LoadContext(config, version, model_dir / version, executor, devices[0])
            instances = await load_instances(context, count)
            config_rules.validate(config, model_dir / config_rules.CONFIG_FILE)  # again, once completed
            if not config.input or not config.output:
                raise config_rules.ConfigError(
                    f"{model_dir / config_rules.CONFIG_FILE}: model '{config.name}' declares no "
                    f"{'inputs' if not config.input else 'outputs'}"
                )
            streams = any(getattr(instance, "streams", False) for instance in instances)
            if streams and not config_rules.is_decoupled(config):
                raise config_rules.ConfigError(
                    f"{model_dir / config_rules.CONFIG_FILE}: predict is a generator, so the model streams; "
                    f"set model_transaction_policy {{ decoupled: true }}"
                )
            return cls(config, version, instances, executor, _read_labels(model_dir, config))
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            raise

    @property
    def in_flight(self) -> int:
        return self._pool.busy + (self._batcher.queued if self._batcher else 0)

    @property
    def queued(self) -> int:
        """Requests waiting in the dynamic batcher's queue (0 without one)."""
        return self._batcher.queued if self._batcher else 0

    async def infer(self, request: InferRequest, trace: RequestTrace | None = None) -> dict[str, np.ndarray]:
        """Run one request through the batcher; raises MeshError on failure.

        ``trace`` (tracing on) gets the request's queue and execute spans.
        """
        if self._batcher is None:   # decoupled
            raise FailedPrecondition(
                f"model '{self.name}' is decoupled (it streams responses); call ModelStreamInfer"
            )
        self.pending_requests += 1
        try:
            outputs = await self._batcher.submit(request, trace)
        except MeshError:
            self.stats.record_request(False, time.perf_counter_ns() - request.arrival_ns)
            raise
        finally:
            self.pending_requests -= 1
        self._check_outputs(outputs, request)
        self.stats.record_request(True, time.perf_counter_ns() - request.arrival_ns)
        return outputs

    def _check_outputs(self, outputs: dict[str, np.ndarray], request: InferRequest) -> None:
        wanted = request.requested_outputs or self.signature.outputs
        missing = [name for name in wanted if name not in outputs]
        if missing:
            raise Internal(f"model '{self.name}' returned no output {', '.join(map(repr, missing))}")

    async def stream(self, request: InferRequest,
                     trace: RequestTrace | None = None) -> AsyncIterator[dict[str, np.ndarray]]:
        """Responses of one request in order; a non-decoupled model yields exactly one.

        With ``trace``, a decoupled model's wait for an instance is the queue
        span and the whole generation one execute span (a batch of one request).
        """
        if not self.decoupled:
            yield await self.infer(request, trace)
            return
        if trace is not None:
            trace.queued()
        instance = await self._pool.acquire()
        # A Triton python model's instance is free once its execute returns, responses or not
        # (runtime/backends/triton_python.py); it hands the instance back itself.
        whole_requests = getattr(instance, "executes_requests", False)
        started = time.perf_counter_ns()
        self.stats.record_queue(started - request.arrival_ns)
        if trace is not None:
            trace.started(time.time_ns(), request.batch_size, 1)
        error = None
        ok = False
        self._streams += 1
        self._no_streams.clear()
        try:
            responses = instance.stream_request(request, lambda: self._pool.release(instance)) \
                if whole_requests else instance.stream(request.inputs)
            async for outputs in responses:
                yield outputs
            ok = True
        except MeshError as err:
            error = err
            raise
        except Exception as err:   # the predictor's own failure: logged with its traceback
            log.error("model '%s' failed a stream: %r", self.name, err, exc_info=err)
            error = Internal(f"model '{self.name}' failed: {type(err).__name__}: {err}")
            raise error from err
        finally:
            if trace is not None:
                trace.finished(time.time_ns(), error)
            self._streams -= 1
            if not self._streams:
                self._no_streams.set()
            if not whole_requests:
                self._pool.release(instance)
            done = time.perf_counter_ns()
            if ok:
                self.stats.record_batch(1, request.batch_size, 0, done - started, 0)
            self.stats.record_request(ok, done - request.arrival_ns)

    def metadata(self, versions: list[str]) -> pb.ModelMetadataResponse:
        return model_metadata(self.config, self.signature, versions)

    async def close(self) -> None:
        """Drain: queued and running requests finish, then instances close."""
        if self._batcher:
            await self._batcher.close()
        await self._no_streams.wait()
        for instance in self._pool.instances:
            await instance.close()
        self._executor.shutdown(wait=False)
