"""The onnxruntime backend: ``<model>/<version>/model.onnx``.

A config may leave out inputs and outputs: they are read from the graph (a
symbolic or unknown dimension becomes -1; with max_batch_size > 0 the first
axis is the batch axis and is dropped from ``dims``). Declared tensors must
exist in the graph. Uses the CUDA execution provider when the model asks
for a GPU and onnxruntime has one; otherwise the CPU provider.
"""

from __future__ import annotations

import asyncio

import numpy as np

from meshserve.common.tensors import DATATYPE_TO_CONFIG
from meshserve.protos.inference import model_config_pb2 as mc

from ..config import ONNX_FILE, ConfigError
from . import LoadContext

_ORT_TYPES = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
    "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16", "tensor(string)": "BYTES",
}


def _dims(shape, batched: bool) -> list[int]:
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in shape]
    return dims[1:] if batched else dims


def complete_config(config: mc.ModelConfig, session, path) -> None:
    """Fill missing inputs/outputs from the graph; check declared ones exist in it."""
    batched = config.max_batch_size > 0
    for kind, graph_tensors, declared in (
        ("input", session.get_inputs(), config.input),
        ("output", session.get_outputs(), config.output),
    ):
        by_name = {t.name: t for t in graph_tensors}
        if not declared:
            for tensor in graph_tensors:
                datatype = _ORT_TYPES.get(tensor.type)
                if datatype is None:
                    raise ConfigError(f"{path}: {kind} '{tensor.name}' has unsupported type {tensor.type}")
                declared.add(
                    name=tensor.name,
                    data_type=mc.DataType.Value(DATATYPE_TO_CONFIG[datatype]),
                    dims=_dims(tensor.shape, batched),
                )
            continue
        for tensor in declared:
            if tensor.name not in by_name:
                raise ConfigError(
                    f"{path}: {kind} '{tensor.name}' is not in the ONNX graph, which has "
                    f"{', '.join(sorted(by_name))}"
                )


class OnnxInstance:
    """One onnxruntime session; ``run`` happens on the model's executor."""

    streams = False

    def __init__(self, session, executor, output_names: list[str]):
        self._session = session
        self._executor = executor
        self._output_names = output_names

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {
            name: array.astype(str) if array.dtype == np.object_ else array
            for name, array in inputs.items()
        }
        results = self._session.run(self._output_names, feed)
        return dict(zip(self._output_names, results, strict=True))

    async def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, inputs)

    async def stream(self, inputs):
        yield await self.execute(inputs)

    async def close(self) -> None:
        self._session = None


def _open_session(path, device: str):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # One execution per instance; the instance group, not intra-op threads, sets concurrency.
    options.intra_op_num_threads = 1
    providers: list[str | tuple[str, dict[str, int]]] = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device.split(":")[1])}))
    return onnxruntime.InferenceSession(str(path), options, providers=providers)


async def load_instances(context: LoadContext, count: int) -> list[OnnxInstance]:
    path = context.version_dir / ONNX_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    loop = asyncio.get_running_loop()
    sessions = [await loop.run_in_executor(context.executor, _open_session, path, context.device)
                for _ in range(count)]
    complete_config(context.config, sessions[0], path)
    output_names = [tensor.name for tensor in context.config.output]
    return [OnnxInstance(session, context.executor, output_names) for session in sessions]
