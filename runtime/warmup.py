"""Triton's ``model_warmup``: sample requests a model answers before it is ready.

Each ``model_warmup`` entry of config.pbtxt names a sample: a batch size, and
per input its data type, dims and data (``zero_data``, ``random_data``, or
``input_data_file``: a file in the model's ``warmup/`` folder holding the raw
tensor, Triton's layout), run ``count`` times (at least once). The model
version becomes ready (and the replica's health SERVING) only after every
sample has answered, so a rollout or an autoscaler never routes calls to a
replica that would take its first calls cold (CUDA context, lazy kernels,
caches). A failing sample fails the load with the sample's name and the
error. Files are read from ``warmup/`` only: a name with a path separator or
``..`` is refused, as is a file whose size does not match.
"""

from __future__ import annotations

import pathlib

import numpy as np

from meshserve.common import tensors
from meshserve.common.model_config import ConfigError
from meshserve.protos.inference import model_config_pb2 as mc

from .request import InferRequest

WARMUP_FOLDER = "warmup"
MAX_SAMPLE_BYTES = 256 * 1024 * 1024   # a sample is a request: the runtime's message limit


def sample_requests(config: mc.ModelConfig, model_dir: pathlib.Path) -> list[tuple[str, int, InferRequest]]:
    """(sample name, times to run, request) per warm-up sample, built and checked before any runs."""
    samples = []
    for number, warmup in enumerate(config.model_warmup):
        name = warmup.name or f"#{number}"
        where = f"{model_dir / 'config.pbtxt'}: model_warmup '{name}'"
        batched = config.max_batch_size > 0
        if batched and not 1 <= warmup.batch_size <= config.max_batch_size:
            raise ConfigError(f"{where}: batch_size {warmup.batch_size} must be within 1..max_batch_size "
                              f"({config.max_batch_size})")
        declared = {tensor.name for tensor in config.input}
        unknown = sorted(set(warmup.inputs) - declared)
        if unknown:
            raise ConfigError(f"{where}: inputs {unknown} are not inputs of the model ({sorted(declared)})")
        missing = sorted(tensor.name for tensor in config.input if tensor.name not in warmup.inputs
                         and not tensor.optional)
        if missing:
            raise ConfigError(f"{where}: no data for inputs {missing}")
        inputs = {
            input_name: _tensor(sample, [warmup.batch_size] if batched else [], model_dir, f"{where} input "
                                f"'{input_name}'")
            for input_name, sample in warmup.inputs.items()
        }
        request = InferRequest(id=f"warmup-{name}", inputs=inputs, batch_size=warmup.batch_size if batched else 1,
                               requested_outputs=None, parameters={})
        samples.append((name, max(1, warmup.count), request))
    return samples


def _tensor(sample: mc.ModelWarmup.Input, batch: list[int], model_dir: pathlib.Path, where: str) -> np.ndarray:
    type_name = mc.DataType.Name(sample.data_type)
    datatype = tensors.CONFIG_TO_DATATYPE.get(type_name)
    if datatype is None:
        raise ConfigError(f"{where}: data_type {type_name} is not a tensor type")
    if any(dim < 0 for dim in sample.dims):
        raise ConfigError(f"{where}: dims {list(sample.dims)} must be fixed (no -1) for a warm-up sample")
    shape = [*batch, *sample.dims]
    count = int(np.prod(shape, dtype=np.int64))
    choice = sample.WhichOneof("input_data_type")
    if choice == "input_data_file":
        return _from_file(sample.input_data_file, datatype, shape, model_dir, where)
    if datatype == "BYTES":
        if choice == "random_data":
            rng = np.random.default_rng()
            items = [rng.bytes(8) for _ in range(count)]
        else:
            items = [b""] * count
        return np.array(items, dtype=np.object_).reshape(shape)
    dtype = tensors.NUMPY_DTYPES[datatype]
    if count * dtype.itemsize > MAX_SAMPLE_BYTES:
        raise ConfigError(f"{where}: {count} elements of {datatype} exceed the {MAX_SAMPLE_BYTES} byte bound")
    if choice == "random_data":
        raw = np.random.default_rng().integers(0, 256, size=count * dtype.itemsize, dtype=np.uint8).tobytes()
        array = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        if array.dtype.kind == "f":
            array[~np.isfinite(array)] = 0   # random bits make NaN and inf; a model need not accept them
        return array
    return np.zeros(shape, dtype=dtype)


def _from_file(file_name: str, datatype: str, shape: list[int], model_dir: pathlib.Path, where: str) -> np.ndarray:
    if not file_name or "/" in file_name or "\\" in file_name or file_name in (".", "..") or "\0" in file_name:
        raise ConfigError(f"{where}: input_data_file {file_name!r} must be a plain file name in "
                          f"{WARMUP_FOLDER}/")
    path = model_dir / WARMUP_FOLDER / file_name
    try:
        if not path.is_file() or path.is_symlink():
            raise ConfigError(f"{where}: input_data_file {path} is not a regular file")
        if path.stat().st_size > MAX_SAMPLE_BYTES:
            raise ConfigError(f"{where}: input_data_file {path} is larger than {MAX_SAMPLE_BYTES} bytes")
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{where}: cannot read input_data_file {path}: {err.strerror}") from None
    try:
        return tensors.from_raw(datatype, shape, data).copy()
    except ValueError as err:
        raise ConfigError(f"{where}: input_data_file {path}: {err}") from None


async def warm_up(model, samples: list[tuple[str, int, InferRequest]]) -> None:
    """Run every sample on ``model`` (a ServedModel), ``count`` times each; raises naming the sample."""
    for name, count, request in samples:
        for _ in range(count):
            try:
                if model.decoupled:
                    async for _response in model.stream(request):
                        pass
                else:
                    await model.infer(request)
            except Exception as err:
                raise ConfigError(f"model '{model.name}' warm-up sample '{name}' failed: {err}") from err
