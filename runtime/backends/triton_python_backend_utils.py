"""The ``triton_python_backend_utils`` surface that Triton Python-backend models use.

A ``model.py`` written for Triton's Python backend does
``import triton_python_backend_utils as pb_utils``. meshserve's loader binds
this module under that top-level name (``sys.modules``) before it imports a
model, so such a model runs unchanged; see ``triton_python.py`` for why it is
bound, not installed as a top-level package.

Guarantees: the names, signatures and behaviour follow Triton's published
module for what a model does *in process*: tensors (``Tensor``), requests
(``InferenceRequest``), responses (``InferenceResponse``, the decoupled
``InferenceResponseSender``), errors (``TritonError`` with Triton's codes,
``TritonModelException``), the config helpers and the type tables. What
needs Triton's server (BLS ``InferenceRequest.exec``, custom metrics, model
loading from a model) raises ``TritonModelException`` saying so.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

TRITON_STRING_TO_NUMPY = {
    "TYPE_BOOL": bool,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}

# Triton's TRITONSERVER_DataType numbers (BOOL = 1 ... BYTES = 13).
_TRITON_TYPE_NUMBERS = [
    (1, np.bool_), (2, np.uint8), (3, np.uint16), (4, np.uint32), (5, np.uint64),
    (6, np.int8), (7, np.int16), (8, np.int32), (9, np.int64), (10, np.float16),
    (11, np.float32), (12, np.float64), (13, np.object_),
]


class TritonModelException(Exception):
    """Raised by (or in) a model; the request(s) fail with INTERNAL and this message."""

    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class TritonError:
    """An error a response carries; ``code`` picks the gRPC status the client sees."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = INTERNAL):
        self._message = str(message)
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, code={self._code})"


class Tensor:
    """A named numpy array (host memory only: ``is_cpu()`` is always true)."""

    def __init__(self, name: str, array, dtype=None):
        if not isinstance(name, str):
            raise TritonModelException(f"a Tensor's name must be a str, not {type(name).__name__}")
        array = np.asarray(array) if dtype is None else np.asarray(array, dtype=dtype)
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def is_cpu(self) -> bool:
        return True

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def triton_dtype(self) -> int | None:
        return numpy_to_triton_type(self._array.dtype.type)

    def to_dlpack(self):
        """A DLPack capsule over the array (numpy's own export; BYTES tensors have none).

        A read-only array (every request input) is copied first: this numpy's
        DLPack export refuses read-only arrays.
        """
        if self._array.dtype == np.object_:
            raise TritonModelException(f"tensor '{self._name}' holds BYTES, which DLPack cannot carry")
        array = self._array
        if not array.flags.writeable:  # request inputs are read-only views; DLPack cannot flag that
            array = array.copy()
        return array.__dlpack__()

    @staticmethod
    def from_dlpack(name: str, capsule) -> Tensor:
        """A tensor from a DLPack capsule or an object with ``__dlpack__`` (a CPU torch tensor, an array)."""
        source = capsule if hasattr(capsule, "__dlpack__") else _HostCapsule(capsule)
        return Tensor(name, np.from_dlpack(source))

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, shape={list(self._array.shape)}, dtype={self._array.dtype})"


class _HostCapsule:
    """A bare DLPack capsule in the shape ``np.from_dlpack`` takes (host memory: Tensor is CPU only)."""

    def __init__(self, capsule):
        self._capsule = capsule

    def __dlpack__(self, **_options):
        return self._capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU, device 0


class InferenceResponse:
    """The answer to one request: output tensors, or an error."""

    def __init__(self, output_tensors=None, error: TritonError | None = None):
        self._output_tensors = list(output_tensors or [])
        self._error = error

    def output_tensors(self) -> list[Tensor]:
        return self._output_tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class InferenceResponseSender:
    """Sends a decoupled request's responses; the last ``send`` carries the FINAL flag.

    ``send`` may be called from any thread; it waits while the client is
    behind (the stream's bound), and returns at once once the request is
    cancelled. After FINAL, or with a response that is not an
    ``InferenceResponse``, it raises ``TritonModelException``, as Triton does.
    """

    def __init__(self, deliver: Callable[[InferenceResponse | None, bool], None],
                 is_cancelled: Callable[[], bool]):
        self._deliver = deliver
        self._is_cancelled = is_cancelled
        self._closed = False
        self._lock = threading.Lock()

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        final = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if response is not None and not isinstance(response, InferenceResponse):
            raise TritonModelException(f"send() takes an InferenceResponse, not {type(response).__name__}")
        if response is None and not final:
            raise TritonModelException("send() without a response needs flags=TRITONSERVER_RESPONSE_COMPLETE_FINAL")
        with self._lock:
            if self._closed:
                raise TritonModelException("Unable to send response. Response sender has been closed.")
            self._closed = final
        self._deliver(response, final)

    def is_cancelled(self) -> bool:
        return self._is_cancelled()


class InferenceRequest:
    """One client request as a model sees it (the server builds these; models read them)."""

    def __init__(self, inputs: list[Tensor], request_id: str = "", correlation_id: int | str = 0,
                 requested_output_names: list[str] | None = None, model_name: str = "",
                 model_version: int = -1, parameters: dict | str | None = None,
                 response_sender: InferenceResponseSender | None = None, **_ignored):
        self._inputs = list(inputs)
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._requested_output_names = list(requested_output_names or [])
        self._model_name = model_name
        self._model_version = model_version
        self._parameters = parameters if isinstance(parameters, str) else json.dumps(parameters or {})
        self._response_sender = response_sender

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self):
        return self._correlation_id

    def requested_output_names(self) -> list[str]:
        return self._requested_output_names

    def model_name(self) -> str:
        return self._model_name

    def model_version(self) -> int:
        return self._model_version

    def parameters(self) -> str:
        """The request's parameters as a JSON object string (Triton's form)."""
        return self._parameters

    def flags(self) -> int:
        return 0

    def timeout(self) -> int:
        return 0

    def is_cancelled(self) -> bool:
        return self._response_sender.is_cancelled() if self._response_sender else False

    def get_response_sender(self) -> InferenceResponseSender:
        if self._response_sender is None:
            raise TritonModelException(
                "get_response_sender() needs model_transaction_policy { decoupled: true }; "
                "without it, return the responses from execute"
            )
        return self._response_sender

    def exec(self, *args, **kwargs):
        raise TritonModelException("BLS (InferenceRequest.exec) is not supported by meshserve")

    async def async_exec(self, *args, **kwargs):
        raise TritonModelException("BLS (InferenceRequest.async_exec) is not supported by meshserve")


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


def get_input_config_by_name(model_config: dict, name: str) -> dict | None:
    for properties in model_config.get("input", []):
        if properties["name"] == name:
            return properties
    return None


def get_output_config_by_name(model_config: dict, name: str) -> dict | None:
    for properties in model_config.get("output", []):
        if properties["name"] == name:
            return properties
    return None


def using_decoupled_model_transaction_policy(model_config: dict) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


def triton_string_to_numpy(triton_type_string: str):
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def triton_to_numpy_type(data_type: int):
    for number, numpy_type in _TRITON_TYPE_NUMBERS:
        if number == data_type:
            return numpy_type
    return None


def numpy_to_triton_type(data_type) -> int | None:
    if data_type == np.bytes_:
        return 13
    for number, numpy_type in _TRITON_TYPE_NUMBERS:
        if data_type == numpy_type:
            return number
    return None


def serialize_byte_tensor(input_tensor: np.ndarray) -> np.ndarray | None:
    """Triton's length-prefixed BYTES encoding, as a uint8 array (None for non-BYTES input)."""
    from meshserve.common.tensors import encode_bytes

    if input_tensor.dtype != np.object_ and input_tensor.dtype.type != np.bytes_:
        return None
    return np.frombuffer(encode_bytes(input_tensor), dtype=np.uint8)


def deserialize_bytes_tensor(encoded_tensor) -> np.ndarray:
    """The inverse of ``serialize_byte_tensor``: a 1-D object array of bytes."""
    from meshserve.common.tensors import decode_bytes

    data = bytes(encoded_tensor)
    count, offset = 0, 0
    while offset + 4 <= len(data):  # count the elements; decode_bytes checks every length
        offset += 4 + int.from_bytes(data[offset:offset + 4], "little")
        count += 1
    return decode_bytes(data, [count])


class ModelConfig:
    """The config an ``auto_complete_config`` sees: only inputs, outputs, batching may change."""

    def __init__(self, model_config: str | dict):
        self._model_config = json.loads(model_config) if isinstance(model_config, str) else model_config

    def as_dict(self) -> dict:
        return self._model_config

    def set_max_batch_size(self, max_batch_size: int) -> None:
        current = self._model_config.get("max_batch_size", 0)
        if current > max_batch_size:
            raise ValueError(
                f"configuration specified max_batch_size {current}, but in auto-complete-config function "
                f"for model '{self._model_config.get('name', '')}' specified max_batch_size {max_batch_size}"
            )
        self._model_config["max_batch_size"] = max_batch_size

    def set_dynamic_batching(self) -> None:
        self._model_config.setdefault("dynamic_batching", {})

    def _add(self, kind: str, tensor: dict) -> None:
        allowed = {"name", "data_type", "dims", "optional"} if kind == "input" else {"name", "data_type", "dims"}
        extra = set(tensor) - allowed
        missing = {"name", "data_type", "dims"} - set(tensor)
        if extra or missing:
            raise ValueError(
                f"{kind} {tensor.get('name', '?')!r} in auto-complete-config function for model "
                f"'{self._model_config.get('name', '')}' must have exactly {sorted(allowed)}"
            )
        declared = self._model_config.setdefault(kind, [])
        for current in declared:
            if current["name"] == tensor["name"]:
                if current.get("data_type") != tensor["data_type"] or list(current.get("dims", [])) != list(
                        tensor["dims"]):
                    raise ValueError(
                        f"{kind} '{tensor['name']}' in auto-complete-config function for model "
                        f"'{self._model_config.get('name', '')}' differs from the configuration"
                    )
                return
        declared.append(dict(tensor))

    def add_input(self, input: dict) -> None:  # noqa: A002 (Triton's parameter name)
        self._add("input", input)

    def add_output(self, output: dict) -> None:
        self._add("output", output)

    def set_model_transaction_policy(self, transaction_policy_dict: dict) -> None:
        self._model_config["model_transaction_policy"] = dict(transaction_policy_dict)
