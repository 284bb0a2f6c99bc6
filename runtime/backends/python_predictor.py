"""The python backend: a ``Predictor`` class in ``<model>/<version>/model.py``.

The contract users write to (Cortex's shape)::

    class Predictor:
        def __init__(self, config: dict): ...      # once per instance
        def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

``predict`` may be ``async def``; a generator (sync or async) makes a
decoupled model that streams one dict per response. ``config`` carries the
model's name, version, version folder, max_batch_size, parameters (str ->
str), declared inputs/outputs, the instance index and the device.
A model may name another class with the ``predictor_class`` parameter.

A ``model.py`` written for Triton's Python backend (``TritonPythonModel``,
no ``Predictor``) is served unchanged by ``triton_python``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import sys

import numpy as np

from meshserve.common.errors import Internal

from ..config import PYTHON_FILE
from ..tensor_spec import TensorSpec
from . import LoadContext, triton_python

PREDICTOR_CLASS = "Predictor"
PREDICTOR_CLASS_PARAMETER = "predictor_class"
_END = object()


def _import_model_module(context: LoadContext):
    path = context.version_dir / PYTHON_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    triton_python.bind_backend_utils()  # before the import: a Triton model imports it at the top
    module_name = f"meshserve_model_{context.config.name}_{context.version}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = str(context.version_dir)
    sys.path.insert(0, folder)  # let model.py import its sibling modules
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def predictor_config(context: LoadContext, instance_index: int) -> dict:
    config = context.config

    def describe(tensors):
        return [
            {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.dims)}
            for spec in map(TensorSpec.from_config, tensors)
        ]

    return {
        "name": config.name,
        "version": context.version,
        "model_dir": str(context.version_dir),
        "max_batch_size": config.max_batch_size,
        "parameters": {key: value.string_value for key, value in config.parameters.items()},
        "inputs": describe(config.input),
        "outputs": describe(config.output),
        "instance_index": instance_index,
        "device": context.device,
    }


def _as_outputs(model: str, result) -> dict[str, np.ndarray]:
    if not isinstance(result, dict):
        raise Internal(f"predictor of model '{model}' returned {type(result).__name__}, not a dict of arrays")
    return {name: value if isinstance(value, np.ndarray) else np.asarray(value) for name, value in result.items()}


class PredictorInstance:
    """One ``Predictor`` object, executed on the model's executor unless it is async."""

    def __init__(self, context: LoadContext, predictor):
        self._model = context.config.name
        self._executor = context.executor
        self._predictor = predictor
        predict = predictor.predict
        self._is_async = inspect.iscoroutinefunction(predict)
        self._is_async_gen = inspect.isasyncgenfunction(predict)
        self._is_gen = inspect.isgeneratorfunction(predict)
        self.streams = self._is_async_gen or self._is_gen

    async def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.streams:
            raise Internal(f"model '{self._model}' has a generator predict; it only streams")
        if self._is_async:
            result = await self._predictor.predict(inputs)
        else:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._executor, self._predictor.predict, inputs)
        return _as_outputs(self._model, result)

    async def stream(self, inputs: dict[str, np.ndarray]):
        if self._is_async_gen:
            async for item in self._predictor.predict(inputs):
                yield _as_outputs(self._model, item)
            return
        if not self._is_gen:  # a plain predict streams as one response
            yield await self.execute(inputs)
            return
        loop = asyncio.get_running_loop()
        generator = self._predictor.predict(inputs)
        try:
            while True:
                item = await loop.run_in_executor(self._executor, next, generator, _END)
                if item is _END:
                    return
                yield _as_outputs(self._model, item)
        finally:
            await loop.run_in_executor(self._executor, generator.close)

    async def close(self) -> None:
        close = getattr(self._predictor, "close", None)
        if close is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, close)


async def load_instances(context: LoadContext, count: int) -> list:
    loop = asyncio.get_running_loop()
    module = await loop.run_in_executor(context.executor, _import_model_module, context)
    parameter = context.config.parameters.get(PREDICTOR_CLASS_PARAMETER)
    if parameter is None and not hasattr(module, PREDICTOR_CLASS) and triton_python.defines_triton_model(module):
        return await triton_python.load_instances(context, count, module)
    class_name = parameter.string_value if parameter else PREDICTOR_CLASS
    cls = getattr(module, class_name, None)
    if cls is None or not callable(getattr(cls, "predict", None)):
        raise ImportError(
            f"{context.version_dir / PYTHON_FILE} defines no class '{class_name}' with a predict method"
        )
    instances = []
    for index in range(count):
        predictor = await loop.run_in_executor(context.executor, cls, predictor_config(context, index))
        instances.append(PredictorInstance(context, predictor))
    return instances
