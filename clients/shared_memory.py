"""System shared memory for the client library: big tensors without copying them through gRPC.

For a client on the same host as the server (the runtime, not the proxy).
Two objects:

* ``SharedMemoryRegion`` — a POSIX shared memory object this process creates
  (``multiprocessing.shared_memory``) and owns: write numpy arrays into it,
  read views out of it, build the tensor parameters that point into it,
  ``close()`` unmaps and unlinks it. Works with any KServe v2 client.
* ``SharedMemory`` / ``AsyncSharedMemory`` — a region registered with one
  server through an ``InferenceClient`` / ``AsyncInferenceClient``, with an
  ``infer`` that sends every input through the region and, for the outputs
  it is asked for, has the server write them into the region::

      with InferenceClient(address) as client, SharedMemory(client, 64 << 20) as shm:
          out = shm.infer("echo_fp32", {"INPUT0": x}, outputs=["OUTPUT0"])

  Entering registers the region; leaving unregisters it and unlinks it.

Layout of one ``infer``: inputs one after another from offset 0, each at a
64-byte boundary; the space after them goes to the shared-memory outputs,
split evenly among ``outputs`` given as names, or as ``{name: byte_size}``.
``outputs=None`` returns every output through gRPC as usual.

Returned shared-memory outputs are read-only numpy views of the region (no
copy; BYTES outputs are decoded copies): the next ``infer`` on the same
object overwrites them, so copy what you keep. One call at a time per object
(calls are serialized); use one object per concurrent caller.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import secrets
import threading
from collections.abc import Mapping, Sequence
from multiprocessing import shared_memory as _mp_shared_memory
from typing import TYPE_CHECKING

import numpy as np
from google.protobuf.internal.containers import MessageMap

from meshserve.common import tensors
from meshserve.common.errors import Internal, InvalidArgument
from meshserve.protos.inference import grpc_service_pb2 as pb

from .encoding import build_infer_request, parameter_value, set_parameter

if TYPE_CHECKING:
    from .async_client import AsyncInferenceClient
    from .sync_client import InferenceClient

REGION_PARAMETER = "shared_memory_region"
OFFSET_PARAMETER = "shared_memory_offset"
BYTE_SIZE_PARAMETER = "shared_memory_byte_size"

# Where shm_open(3) keeps its objects on Linux: the server maps the same file.
SHM_DIRECTORY = "/dev/shm"

# Tensors start at 64-byte boundaries: a cache line, and aligned for every numpy dtype.
ALIGNMENT = 64


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def tensor_parameters(region: str, offset: int, byte_size: int) -> dict[str, object]:
    """The parameters that place a tensor (input or requested output) in a registered region."""
    return {REGION_PARAMETER: region, OFFSET_PARAMETER: offset, BYTE_SIZE_PARAMETER: byte_size}


class SharedMemoryRegion:
    """A POSIX shared memory object created and owned by this process.

    ``key`` is its shm_open name ("/meshserve_..."); ``name`` the region name
    to register it under (the key without "/" unless given). ``close()``
    unmaps and unlinks; if numpy views of it are still alive the mapping
    stays until they are gone (never a dangling view), the object is
    unlinked regardless.
    """

    def __init__(self, byte_size: int, name: str | None = None):
        if byte_size <= 0:
            raise InvalidArgument(f"a shared memory region needs a positive size, not {byte_size}")
        # multiprocessing creates the object (and unlinks it at exit if we never do); the
        # mapping is our own, so numpy views alive at close() keep it without complaint.
        self._shm = _mp_shared_memory.SharedMemory(
            name=f"meshserve_{secrets.token_hex(8)}", create=True, size=byte_size)
        try:
            fd = os.open(os.path.join(SHM_DIRECTORY, self._shm.name), os.O_RDWR)
            try:
                self._mmap = mmap.mmap(fd, byte_size)
            finally:
                os.close(fd)
        finally:
            self._shm.close()
        self._buf = memoryview(self._mmap)
        self.key = "/" + self._shm.name
        self.name = name or self._shm.name
        self.byte_size = byte_size
        self._closed = False

    @property
    def buffer(self) -> memoryview:
        return self._buf

    def write(self, array: np.ndarray, offset: int = 0) -> tuple[str, int]:
        """Write ``array`` in raw layout at ``offset``; returns ``(datatype, byte_size)``."""
        array = np.asarray(array)
        try:
            datatype = tensors.datatype_of(array)
            if datatype == "BYTES":
                data = tensors.encode_bytes(array)
                size = len(data)
            else:
                size = array.nbytes
        except ValueError as err:
            raise InvalidArgument(f"cannot write to region '{self.name}': {err}") from None
        if offset < 0 or offset + size > self.byte_size:
            raise InvalidArgument(
                f"{size} bytes at offset {offset} do not fit region '{self.name}' ({self.byte_size} bytes)")
        if datatype == "BYTES":
            self._buf[offset:offset + size] = data
        else:
            target = np.frombuffer(self._buf, dtype=array.dtype, count=array.size, offset=offset)
            target.reshape(array.shape)[...] = array
        return datatype, size

    def read(self, datatype: str, shape: Sequence[int], offset: int = 0, byte_size: int | None = None) -> np.ndarray:
        """The tensor at ``offset``: a read-only view (BYTES: a decoded copy of ``byte_size`` bytes)."""
        shape = list(shape)
        if datatype == "BYTES":
            end = self.byte_size if byte_size is None else offset + byte_size
            return tensors.decode_bytes(self._buf[offset:end], shape)
        dtype = tensors.NUMPY_DTYPES[datatype]
        count = tensors.element_count(shape)
        if offset < 0 or offset + count * dtype.itemsize > self.byte_size:
            raise InvalidArgument(
                f"{datatype} {shape} at offset {offset} is outside region '{self.name}' ({self.byte_size} bytes)")
        array = np.frombuffer(self._buf, dtype=dtype, count=count, offset=offset).reshape(shape)
        array.flags.writeable = False
        return array

    def close(self) -> None:
        """Unmap (once no view is left) and unlink; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._buf.release()
            self._mmap.close()
        except BufferError:
            pass  # numpy views still alive keep the mapping; it goes with them
        self._shm.unlink()

    def __enter__(self) -> SharedMemoryRegion:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _register_request(region: SharedMemoryRegion) -> pb.SystemSharedMemoryRegisterRequest:
    return pb.SystemSharedMemoryRegisterRequest(name=region.name, key=region.key, offset=0,
                                                byte_size=region.byte_size)


def _build_request(region: SharedMemoryRegion, model: str, inputs: Mapping[str, np.ndarray],
                   outputs: Sequence[str] | Mapping[str, int] | None, *, version: str | None,
                   request_id: str | None, parameters: Mapping[str, object] | None) -> pb.ModelInferRequest:
    """Write ``inputs`` into ``region`` and build a request that points at them (see the module layout)."""
    if isinstance(outputs, str):
        raise InvalidArgument("outputs must be a list of output names or {name: byte_size}, not a str")
    request = build_infer_request(model, {}, None, version=version, request_id=request_id, parameters=parameters)
    offset = 0
    for name, value in inputs.items():
        array = np.asarray(value)
        try:
            datatype, size = region.write(array, offset)
        except InvalidArgument as err:
            raise InvalidArgument(f"input {name!r}: {err.message}") from None
        tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        _set(tensor.parameters, tensor_parameters(region.name, offset, size))
        offset = _aligned(offset + size)
    if not outputs:
        return request
    if isinstance(outputs, Mapping):
        sizes = dict(outputs)
    else:
        share = (region.byte_size - offset) // len(outputs) // ALIGNMENT * ALIGNMENT
        sizes = dict.fromkeys(outputs, share)
    for name, size in sizes.items():
        if size <= 0 or offset + size > region.byte_size:
            raise InvalidArgument(
                f"output {name!r}: no room in region '{region.name}' ({region.byte_size} bytes, "
                f"{offset} used by earlier tensors); make the region larger")
        output = request.outputs.add(name=name)
        _set(output.parameters, tensor_parameters(region.name, offset, size))
        offset = _aligned(offset + size)
    return request


def _set(target: MessageMap[str, pb.InferParameter], parameters: dict[str, object]) -> None:
    for key in (REGION_PARAMETER, OFFSET_PARAMETER, BYTE_SIZE_PARAMETER):
        set_parameter(target[key], parameters[key])


def decode_response(response: pb.ModelInferResponse, region: SharedMemoryRegion) -> dict[str, np.ndarray]:
    """Output name -> array: shared-memory outputs read from ``region``, the others from raw contents."""
    raw = response.raw_output_contents
    result: dict[str, np.ndarray] = {}
    for index, output in enumerate(response.outputs):
        try:
            if REGION_PARAMETER in output.parameters:
                parameters = output.parameters
                if parameters[REGION_PARAMETER].string_param != region.name:
                    raise ValueError(f"is in region {parameters[REGION_PARAMETER].string_param!r}, not {region.name!r}")
                offset = _int_parameter(parameters, OFFSET_PARAMETER) or 0
                size = _int_parameter(parameters, BYTE_SIZE_PARAMETER)
                result[output.name] = region.read(output.datatype, output.shape, offset, size)
            elif index < len(raw):
                result[output.name] = tensors.from_raw(output.datatype, output.shape, raw[index])
            else:
                result[output.name] = tensors.from_contents(output.datatype, output.shape, output.contents)
        except (ValueError, InvalidArgument) as err:
            message = getattr(err, "message", str(err))
            raise Internal(f"output {output.name!r} of model {response.model_name!r}: {message}") from None
    return result


def _int_parameter(parameters: MessageMap[str, pb.InferParameter], key: str) -> int | None:
    """``parameters[key]`` as an integer; None when absent or unset; ValueError for any other kind of value."""
    value = parameter_value(parameters[key]) if key in parameters else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"parameter {key!r} is {value!r}, not an integer")
    return value


class SharedMemory:
    """One ``SharedMemoryRegion`` registered with the server of an ``InferenceClient``.

    ``with SharedMemory(client, byte_size) as shm`` registers on entry and
    unregisters and unlinks on exit; or call ``register()`` and ``close()``.
    """

    def __init__(self, client: InferenceClient, byte_size: int, name: str | None = None) -> None:
        self.client = client
        self.region = SharedMemoryRegion(byte_size, name)
        self._registered = False
        self._lock = threading.Lock()

    def register(self, *, timeout: float | None = None) -> None:
        self.client._unary(self.client._stub.SystemSharedMemoryRegister, _register_request(self.region), timeout)
        self._registered = True

    def unregister(self, *, timeout: float | None = None) -> None:
        request = pb.SystemSharedMemoryUnregisterRequest(name=self.region.name)
        self.client._unary(self.client._stub.SystemSharedMemoryUnregister, request, timeout)
        self._registered = False

    def infer(self, model: str, inputs: Mapping[str, np.ndarray],
              outputs: Sequence[str] | Mapping[str, int] | None = None, version: str | None = None,
              timeout: float | None = None, request_id: str | None = None,
              parameters: Mapping[str, object] | None = None) -> dict[str, np.ndarray]:
        """Like ``InferenceClient.infer``, with tensors through the region (see the module layout)."""
        with self._lock:
            request = _build_request(self.region, model, inputs, outputs, version=version, request_id=request_id,
                                     parameters=parameters)
            response = self.client._unary(self.client._stub.ModelInfer, request, timeout)
            return decode_response(response, self.region)

    def close(self) -> None:
        """Unregister (if registered) and unlink the region."""
        try:
            if self._registered:
                self.unregister()
        finally:
            self.region.close()

    def __enter__(self) -> SharedMemory:
        try:
            self.register()
        except BaseException:
            self.region.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncSharedMemory:
    """``SharedMemory`` for an ``AsyncInferenceClient``: the same calls with ``await`` / ``async with``."""

    def __init__(self, client: AsyncInferenceClient, byte_size: int, name: str | None = None) -> None:
        self.client = client
        self.region = SharedMemoryRegion(byte_size, name)
        self._registered = False
        self._lock = asyncio.Lock()

    async def register(self, *, timeout: float | None = None) -> None:
        await self.client._unary(self.client._stub.SystemSharedMemoryRegister,
                                 _register_request(self.region), timeout)
        self._registered = True

    async def unregister(self, *, timeout: float | None = None) -> None:
        request = pb.SystemSharedMemoryUnregisterRequest(name=self.region.name)
        await self.client._unary(self.client._stub.SystemSharedMemoryUnregister, request, timeout)
        self._registered = False

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray],
                    outputs: Sequence[str] | Mapping[str, int] | None = None, version: str | None = None,
                    timeout: float | None = None, request_id: str | None = None,
                    parameters: Mapping[str, object] | None = None) -> dict[str, np.ndarray]:
        async with self._lock:
            request = _build_request(self.region, model, inputs, outputs, version=version, request_id=request_id,
                                     parameters=parameters)
            response = await self.client._unary(self.client._stub.ModelInfer, request, timeout)
            return decode_response(response, self.region)

    async def close(self) -> None:
        try:
            if self._registered:
                await self.unregister()
        finally:
            self.region.close()

    async def __aenter__(self) -> AsyncSharedMemory:
        try:
            await self.register()
        except BaseException:
            self.region.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
