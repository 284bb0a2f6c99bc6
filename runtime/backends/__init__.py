"""Model backends: how one instance of a model executes.

Each backend module offers ``load_instances(context, count) -> list[Instance]``.
An ``Instance`` is used by one execution at a time (the model's instance
pool guarantees it) and offers:

- ``async execute(inputs) -> outputs`` for a batch of inputs, and
- ``stream(inputs)``, an async iterator of outputs for decoupled models,
- ``async close()``.

An instance with ``executes_requests = True`` (a Triton python model,
``triton_python.py``) instead takes whole requests:
``async execute_requests(requests) -> [outputs | MeshError]`` for a batch,
and ``stream_request(request, release)`` for a decoupled one, calling
``release`` itself once its execute returns.

Blocking work (a synchronous predictor, onnxruntime) runs in the model's
executor, never on the event loop.
"""

from __future__ import annotations

import concurrent.futures
import pathlib
from dataclasses import dataclass

from meshserve.protos.inference import model_config_pb2 as mc


@dataclass
class LoadContext:
    """Everything a backend needs to load one version of a model."""

    config: mc.ModelConfig
    version: str
    version_dir: pathlib.Path
    executor: concurrent.futures.ThreadPoolExecutor
    device: str  # "cpu" or "cuda:N"


async def load_instances(context: LoadContext, count: int) -> list:
    """Load ``count`` instances with the backend the config names."""
    from ..config import is_onnx

    if is_onnx(context.config):
        from . import onnx
        return await onnx.load_instances(context, count)
    from . import python_predictor
    return await python_predictor.load_instances(context, count)
