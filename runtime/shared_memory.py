"""System shared memory: tensors read from and written to POSIX shared memory regions.

Triton's ``system_shared_memory`` extension. A client on the same host
creates a POSIX shared memory object (``shm_open``; Python's
``multiprocessing.shared_memory``), registers a window of it under a region
name, and then names that region in a tensor's parameters
(``shared_memory_region``, ``shared_memory_offset``,
``shared_memory_byte_size``) instead of sending the bytes.

Guarantees:

- A registered region stays mapped until it is unregistered (or the
  registry closes). Unregistering unmaps it at once unless a request in
  flight still holds a view of it; then the mapping goes when the last view
  does, so a request never reads unmapped memory.
- Keys are names in the shared memory namespace (``/dev/shm`` on Linux):
  ``"/name"`` (Triton's form) and ``"name"`` (Python's) are the same object;
  a key with any other ``/`` is refused, so a key can never reach a file
  outside that namespace.
- ``locate`` either returns a memoryview of exactly ``byte_size`` bytes
  inside a registered region, or raises: ``NotFound`` for an unknown region,
  ``InvalidArgument`` naming offset and size when the window falls outside.

Opening and mapping a tmpfs object is a few system calls, cheap enough for
the event loop. The mapping is read-write: outputs are written into it.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from protos.errors import AlreadyExists, InvalidArgument, NotFound

# Where shm_open(3) keeps its objects on Linux (glibc maps "/name" to this folder).
SHM_DIRECTORY = "/dev/shm"

# Tensor parameters (KServe v2 / Triton) that place a tensor's data in a region.
REGION_PARAMETER = "shared_memory_region"
OFFSET_PARAMETER = "shared_memory_offset"
BYTE_SIZE_PARAMETER = "shared_memory_byte_size"


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's bytes live: ``byte_size`` bytes at ``offset`` inside region ``region``."""

    region: str
    offset: int
    byte_size: int


def _integer(parameter, tensor: str, key: str) -> int:
    choice = parameter.WhichOneof("parameter_choice")
    value = getattr(parameter, choice) if choice else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(f"{tensor}: parameter '{key}' must be a non-negative integer, not {value!r}")
    return value


def tensor_location(parameters, tensor: str) -> TensorLocation | None:
    """The shared-memory location named by a tensor's parameters, or None if it names none.

    ``tensor`` is how errors name the tensor ("input 'INPUT0'").
    """
    if not parameters or REGION_PARAMETER not in parameters:
        return None
    region_parameter = parameters[REGION_PARAMETER]
    if region_parameter.WhichOneof("parameter_choice") != "string_param" or not region_parameter.string_param:
        raise InvalidArgument(f"{tensor}: parameter '{REGION_PARAMETER}' must be a region name (a string)")
    if BYTE_SIZE_PARAMETER not in parameters:
        raise InvalidArgument(
            f"{tensor}: parameter '{BYTE_SIZE_PARAMETER}' is required with '{REGION_PARAMETER}'"
        )
    offset = _integer(parameters[OFFSET_PARAMETER], tensor, OFFSET_PARAMETER) if OFFSET_PARAMETER in parameters else 0
    byte_size = _integer(parameters[BYTE_SIZE_PARAMETER], tensor, BYTE_SIZE_PARAMETER)
    return TensorLocation(region_parameter.string_param, offset, byte_size)


def shm_path(key: str) -> str:
    """The file of shared memory object ``key`` ("/name" or "name"); refuses anything else."""
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or name in (".", ".."):
        raise InvalidArgument(
            f"shared memory key {key!r} is not a shared memory object name (use '/name' or 'name')"
        )
    return os.path.join(SHM_DIRECTORY, name)


class SharedMemoryRegion:
    """One registered window of a shared memory object, mapped read-write."""

    def __init__(self, name: str, key: str, offset: int, byte_size: int):
        path = shm_path(key)
        if byte_size <= 0:
            raise InvalidArgument(f"shared memory region '{name}': byte_size must be positive, not {byte_size}")
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise NotFound(f"shared memory key '{key}' does not exist (no {path})") from None
        except PermissionError:
            raise InvalidArgument(f"shared memory key '{key}' cannot be opened read-write by the server") from None
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise InvalidArgument(
                    f"shared memory region '{name}': offset {offset} + byte_size {byte_size} "
                    f"= {offset + byte_size} is beyond the end of key '{key}' ({size} bytes)"
                )
            start = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be aligned
            self._mmap = mmap.mmap(fd, offset + byte_size - start, offset=start)
        finally:
            os.close(fd)  # the mapping keeps the object alive
        self.name = name
        self.key = key
        self.offset = offset
        self.byte_size = byte_size
        self._view = memoryview(self._mmap)[offset - start:]

    def window(self, location: TensorLocation, tensor: str) -> memoryview:
        """The ``location.byte_size`` bytes at ``location.offset`` of this region."""
        if location.offset + location.byte_size > self.byte_size:
            raise InvalidArgument(
                f"{tensor}: shared_memory_offset {location.offset} + shared_memory_byte_size "
                f"{location.byte_size} is outside region '{self.name}' ({self.byte_size} bytes)"
            )
        return self._view[location.offset:location.offset + location.byte_size]

    def close(self) -> None:
        """Unmap now, or (while requests still hold views) when the last view is gone."""
        try:
            self._view.release()
            self._mmap.close()
        except BufferError:
            pass  # views in flight keep the mapping; it is unmapped when they are collected


class SharedMemoryRegistry:
    """The regions registered with one server, by name."""

    def __init__(self):
        self._regions: dict[str, SharedMemoryRegion] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise InvalidArgument("a shared memory region needs a name")
        if name in self._regions:
            raise AlreadyExists(f"shared memory region '{name}' is already registered")
        self._regions[name] = SharedMemoryRegion(name, key, offset, byte_size)

    def unregister(self, name: str = "") -> None:
        """Unregister ``name``, or every region when ``name`` is empty. Unknown names are no error
        (as in Triton: unregistering is idempotent)."""
        names = [name] if name else list(self._regions)
        for each in names:
            region = self._regions.pop(each, None)
            if region is not None:
                region.close()

    def status(self, name: str = "") -> list[SharedMemoryRegion]:
        """The region ``name`` (NotFound if unknown), or every region when ``name`` is empty."""
        if not name:
            return list(self._regions.values())
        region = self._regions.get(name)
        if region is None:
            raise NotFound(f"shared memory region '{name}' is not registered")
        return [region]

    def locate(self, location: TensorLocation, tensor: str) -> memoryview:
        region = self._regions.get(location.region)
        if region is None:
            raise NotFound(f"{tensor}: shared memory region '{location.region}' is not registered")
        return region.window(location, tensor)

    def close(self) -> None:
        self.unregister()
