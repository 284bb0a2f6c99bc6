"""Turning a ModelInferRequest into validated numpy inputs, and outputs into a response.

Guarantees: ``decode_request`` either returns inputs that match the model's
declared names, datatypes and shapes exactly (batch axis included), or raises
``InvalidArgument`` naming the tensor and the problem. Unknown request
parameters are tolerated. ``encode_response`` always answers in
``raw_output_contents``, as Triton does, filtered to the requested outputs.

Shared memory (``runtime.shared_memory``): an input whose parameters name a
region is read from it, with the same size and shape checks as raw bytes;
``raw_input_contents`` then holds one entry per *other* input, in order (as
Triton reads them). Inputs are read-only arrays over one copy of the
region's bytes, read when the request is decoded (a client may shrink its
region at any time; the server never maps it). A requested output whose
parameters name a region is written into it; the response carries its
name, datatype, shape and region parameters (``shared_memory_byte_size`` =
bytes written) and an empty ``raw_output_contents`` entry, keeping entries
one per output.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from meshserve.common import tensors
from meshserve.common.errors import InvalidArgument, NotFound
from meshserve.protos.inference import grpc_service_pb2 as pb

from .shared_memory import (
    BYTE_SIZE_PARAMETER,
    OFFSET_PARAMETER,
    REGION_PARAMETER,
    SharedMemoryRegion,
    SharedMemoryRegistry,
    TensorLocation,
    tensor_location,
)
from .tensor_spec import TensorSpec

# Reserved request parameter names (KServe v2 / Triton).
TIMEOUT_PARAMETER = "timeout"  # microseconds a request may wait in the queue
CLASSIFICATION_PARAMETER = "classification"  # on a requested output: top-k labels
FINAL_RESPONSE_PARAMETER = "triton_final_response"
EMPTY_FINAL_PARAMETER = "triton_enable_empty_final_response"


@dataclass
class InferRequest:
    """One validated request, ready for the batcher."""

    id: str
    inputs: dict[str, np.ndarray]
    batch_size: int
    requested_outputs: dict[str, int] | None  # output name -> classification top-k (0 = tensor)
    parameters: dict[str, object]
    deadline: float | None = None  # time.monotonic() after which it may not start
    arrival_ns: int = field(default_factory=time.perf_counter_ns)
    # Requested outputs to write into shared memory: name -> (location, its region).
    output_regions: dict[str, tuple[TensorLocation, SharedMemoryRegion]] | None = None


@dataclass(frozen=True)
class ModelSignature:
    """What a request is checked against: the model's declared tensors and batching."""

    name: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    max_batch_size: int
    default_timeout_us: int = 0


def parameter_value(parameter: pb.InferParameter):
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice else None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _top_k(output: str, parameter: pb.InferParameter) -> int:
    """The ``classification`` parameter of a requested output: a whole number of classes, 0 or more."""
    value = parameter_value(parameter)
    if not _is_number(value) or not math.isfinite(value) or value < 0 or value != int(value):
        raise InvalidArgument(
            f"output '{output}': parameter '{CLASSIFICATION_PARAMETER}' must be a whole number of "
            f"classes (0 or more), not {value!r:.40}"
        )
    return int(value)


def _deadline(timeout_us, default_timeout_us: int) -> float | None:
    """The ``time.monotonic()`` deadline of a ``timeout`` in microseconds (none when 0 or absent).

    Only a finite number of 0 or more is a timeout: NaN would never expire.
    """
    timeout_us = timeout_us or default_timeout_us
    if not _is_number(timeout_us) or not math.isfinite(timeout_us) or timeout_us < 0:
        raise InvalidArgument(
            f"parameter '{TIMEOUT_PARAMETER}' must be a finite number of microseconds, 0 or more, "
            f"not {timeout_us!r:.40}"
        )
    return time.monotonic() + timeout_us / 1e6 if timeout_us else None


def _region(shared_memory: SharedMemoryRegistry | None, location: TensorLocation,
            tensor: str) -> SharedMemoryRegion:
    if shared_memory is None:
        raise NotFound(f"{tensor}: shared memory region '{location.region}' is not registered")
    return shared_memory.region(location, tensor)


def _input_locations(request: pb.ModelInferRequest) -> list[TensorLocation | None] | None:
    """Per input, its shared-memory location or None; None when no input uses shared memory."""
    if not any(tensor.parameters for tensor in request.inputs):
        return None  # the common case costs one pass over the inputs
    locations = [tensor_location(tensor.parameters, f"input '{tensor.name}'") for tensor in request.inputs]
    return locations if any(locations) else None


def decode_request(request: pb.ModelInferRequest, signature: ModelSignature,
                   shared_memory: SharedMemoryRegistry | None = None) -> InferRequest:
    """Validate and decode ``request`` against ``signature``; see the module guarantee.

    ``shared_memory`` resolves the regions that tensors name (none registered when None).
    """
    model = signature.name
    raw = request.raw_input_contents
    locations = _input_locations(request)
    expected_raw = len(request.inputs) - (sum(1 for each in locations if each) if locations else 0)
    if raw and len(raw) != expected_raw:
        in_shm = f" ({len(request.inputs) - expected_raw} in shared memory)" if locations else ""
        raise InvalidArgument(
            f"request has {len(request.inputs)} inputs{in_shm} but {len(raw)} raw_input_contents entries; "
            f"they must be one per input not in shared memory, in order"
        )
    inputs: dict[str, np.ndarray] = {}
    batch_size = None
    raw_index = 0
    for index, tensor in enumerate(request.inputs):
        spec = signature.inputs.get(tensor.name)
        if spec is None:
            raise InvalidArgument(
                f"unexpected input '{tensor.name}' for model '{model}'; "
                f"it takes {', '.join(sorted(signature.inputs))}"
            )
        if tensor.name in inputs:
            raise InvalidArgument(f"input '{tensor.name}' appears twice in the request")
        if tensor.datatype != spec.datatype:
            raise InvalidArgument(
                f"input '{tensor.name}' has datatype {tensor.datatype or '(none)'} but model '{model}' "
                f"expects {spec.datatype}"
            )
        shape = list(tensor.shape)
        spec.check_shape(model, shape, signature.max_batch_size)
        location = locations[index] if locations else None
        try:
            if tensor.datatype == "BYTES":
                tensors.check_bytes_elements(shape)  # before any decoding work
            if location is not None:
                if tensor.HasField("contents"):
                    raise ValueError("has typed contents as well as a shared memory region; send one or the other")
                what = f"input '{tensor.name}'"
                region = _region(shared_memory, location, what)
                dtype = tensors.NUMPY_DTYPES.get(tensor.datatype)
                if tensor.datatype != "BYTES" and dtype is not None:
                    needed = tensors.element_count(shape) * dtype.itemsize
                    if location.byte_size != needed:
                        raise InvalidArgument(
                            f"{what}: shared_memory_byte_size {location.byte_size} in region '{location.region}' "
                            f"does not match shape {shape} of {tensor.datatype}, which needs {needed} bytes"
                        )
                array = tensors.from_raw(tensor.datatype, shape, region.read(location, what))
            elif raw:
                if tensor.HasField("contents"):
                    raise ValueError("has typed contents as well as raw_input_contents; send one or the other")
                array = tensors.from_raw(tensor.datatype, shape, raw[raw_index])
                raw_index += 1
            else:
                array = tensors.from_contents(tensor.datatype, shape, tensor.contents)
        except ValueError as err:
            where = f" (shared memory region '{location.region}')" if location is not None else ""
            raise InvalidArgument(f"input '{tensor.name}'{where}: {err}") from None
        if signature.max_batch_size > 0:
            if batch_size is None:
                batch_size = shape[0]
            elif shape[0] != batch_size:
                raise InvalidArgument(
                    f"input '{tensor.name}' has batch size {shape[0]} but other inputs have {batch_size}"
                )
        inputs[tensor.name] = array
    for name, spec in signature.inputs.items():
        if name not in inputs and not spec.optional:
            raise InvalidArgument(f"missing input '{name}' for model '{model}'")

    requested = None
    output_regions = None
    if request.outputs:
        requested = {}
        for output in request.outputs:
            if output.name not in signature.outputs:
                raise InvalidArgument(
                    f"unknown output '{output.name}' requested from model '{model}'; "
                    f"it has {', '.join(sorted(signature.outputs))}"
                )
            top_k = output.parameters.get(CLASSIFICATION_PARAMETER)
            requested[output.name] = _top_k(output.name, top_k) if top_k is not None else 0
            if requested[output.name] and signature.outputs[output.name].datatype == "BYTES":
                raise InvalidArgument(f"output '{output.name}' is BYTES; parameter "
                                      f"'{CLASSIFICATION_PARAMETER}' ranks numeric outputs only")
            if not output.parameters:
                continue
            what = f"output '{output.name}'"
            location = tensor_location(output.parameters, what)
            if location is not None:
                if output_regions is None:
                    output_regions = {}
                output_regions[output.name] = (location, _region(shared_memory, location, what))

    parameters = {key: parameter_value(value) for key, value in request.parameters.items()}
    deadline = _deadline(parameters.get(TIMEOUT_PARAMETER), signature.default_timeout_us)
    return InferRequest(
        id=request.id,
        inputs=inputs,
        batch_size=batch_size or 1,
        requested_outputs=requested,
        parameters=parameters,
        deadline=deadline,
        output_regions=output_regions,
    )


def classify(array: np.ndarray, top_k: int, labels: list[str] | None, batched: bool) -> np.ndarray:
    """Triton's classification extension: the top-k "score:index[:label]" strings per item."""
    rows = array.reshape(array.shape[0], -1) if batched else array.reshape(1, -1)
    k = min(top_k, rows.shape[1])
    result = np.empty((rows.shape[0], k), dtype=np.object_)
    for row_index, row in enumerate(rows):
        order = np.argsort(-row.astype(np.float64), kind="stable")[:k]
        for column, index in enumerate(order):
            label = f":{labels[index]}" if labels and index < len(labels) else ""
            result[row_index, column] = f"{float(row[index]):f}:{index}{label}".encode()
    return result if batched else result.reshape(k)


def encode_response(
    model: str,
    version: str,
    request_id: str,
    outputs: dict[str, np.ndarray],
    signature: ModelSignature,
    requested: dict[str, int] | None,
    labels: dict[str, list[str]] | None = None,
    parameters: dict[str, pb.InferParameter] | None = None,
    output_regions: dict[str, tuple[TensorLocation, SharedMemoryRegion]] | None = None,
) -> pb.ModelInferResponse:
    """Build a response carrying ``outputs`` (filtered to ``requested``) as raw contents.

    Outputs in ``output_regions`` are written into their shared memory instead
    (``InvalidArgument`` naming output and region if it is too small).
    """
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    if parameters:
        for key, value in parameters.items():
            response.parameters[key].CopyFrom(value)
    names = requested if requested is not None else outputs
    for name in names:
        if name not in outputs:
            continue  # a streaming response may carry a subset of outputs
        array = outputs[name]
        spec = signature.outputs.get(name)
        datatype = spec.datatype if spec else tensors.datatype_of(array)
        top_k = requested.get(name, 0) if requested else 0
        if top_k:
            array = classify(array, top_k, (labels or {}).get(name), signature.max_batch_size > 0)
            datatype = "BYTES"
        tensor = response.outputs.add(name=name, datatype=datatype)
        tensor.shape.extend(array.shape)
        region = output_regions.get(name) if output_regions else None
        if region is None:
            response.raw_output_contents.append(tensors.to_raw(array, datatype))
            continue
        location, shared = region
        written = write_to_region(name, array, datatype, location, shared)
        tensor.parameters[REGION_PARAMETER].string_param = location.region
        tensor.parameters[OFFSET_PARAMETER].int64_param = location.offset
        tensor.parameters[BYTE_SIZE_PARAMETER].int64_param = written
        response.raw_output_contents.append(b"")  # Triton keeps one entry per output
    return response


def write_to_region(name: str, array: np.ndarray, datatype: str, location: TensorLocation,
                    region: SharedMemoryRegion) -> int:
    """Write one output into its shared memory window; returns the bytes written."""
    dtype = tensors.NUMPY_DTYPES[datatype]
    data: bytes | np.ndarray
    if datatype == "BYTES":
        data = tensors.to_raw(array, datatype)
        size = len(data)
    else:
        size = array.size * dtype.itemsize
    if size > location.byte_size:
        raise InvalidArgument(
            f"output '{name}' needs {size} bytes but shared memory region '{location.region}' "
            f"gives it {location.byte_size} (shared_memory_byte_size) at offset {location.offset}"
        )
    if datatype != "BYTES":  # one contiguous buffer of the declared datatype, written with one pwrite
        data = np.ascontiguousarray(array, dtype=dtype).reshape(-1).view(np.uint8)
    region.write(location, data, f"output '{name}'")
    return size
