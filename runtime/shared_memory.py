"""System shared memory: tensors read from and written to POSIX shared memory regions.

Triton's ``system_shared_memory`` extension. A client on the same host
creates a POSIX shared memory object (``shm_open``; Python's
``multiprocessing.shared_memory``), registers a window of it under a region
name, and then names that region in a tensor's parameters
(``shared_memory_region``, ``shared_memory_offset``,
``shared_memory_byte_size``) instead of sending the bytes.

Guarantees:

- The object belongs to the client, who may shrink it (``ftruncate``) at any
  moment. So the server never maps it: touching a mapped page past the new
  end raises SIGBUS and would kill the process with every model on it. A
  registered region holds the object open (a file descriptor) and every
  read and write goes through ``pread``/``pwrite``, after checking the
  object's current size (``fstat``) against the registered window. A region
  that has shrunk answers ``InvalidArgument`` naming it, on every use, and
  works again if the client restores the size. Inputs are therefore copied
  once out of the region (a kernel copy, memcpy speed), outputs written with
  one ``pwrite``.
- A registered region stays open until it is unregistered (or the registry
  closes). Reads, writes, registering and unregistering all run on the event
  loop thread, so a region is never closed during a read or write; a request
  that still holds a region when it is unregistered gets ``NotFound`` when it
  writes its output, never a write into whatever file reused the descriptor.
- Keys are names in the shared memory namespace (``/dev/shm`` on Linux):
  ``"/name"`` (Triton's form) and ``"name"`` (Python's) are the same object.
  A key with any other ``/``, a NUL byte or more than ``NAME_MAX`` bytes, a
  symlink, or anything but a regular file is refused ``InvalidArgument``, so
  a key can never reach a file outside that namespace.
- ``read`` either returns exactly ``byte_size`` bytes of a registered
  region, or raises: ``NotFound`` for an unknown region, ``InvalidArgument``
  naming offset and size when the window falls outside, or naming the region
  when it has shrunk.

Opening a tmpfs object, ``fstat`` and a read or write of a tensor are a few
system calls plus a memcpy, cheap enough for the event loop.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from protos.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted

# Where shm_open(3) keeps its objects on Linux (glibc maps "/name" to this folder).
SHM_DIRECTORY = "/dev/shm"
# The longest file name Linux allows (NAME_MAX); a longer key cannot name an object.
NAME_MAX = 255
# Linux transfers at most this much per read/write call (0x7ffff000); larger tensors take several.
_MAX_TRANSFER = 0x7FFFF000
# O_NOFOLLOW: a symlink planted in /dev/shm must not lead outside it (shm_open refuses them too).
# O_NONBLOCK: opening a FIFO planted there must not block the event loop.
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

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
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise InvalidArgument(
            f"shared memory key {key!r:.80} is not a shared memory object name (use '/name' or 'name')"
        )
    if len(name.encode("utf-8", "surrogatepass")) > NAME_MAX:
        raise InvalidArgument(
            f"shared memory key {key!r:.80} is longer than {NAME_MAX} bytes, the longest object name"
        )
    return os.path.join(SHM_DIRECTORY, name)


def _open_object(key: str) -> int:
    """A read-write descriptor of the regular file behind ``key``; errors name the key."""
    path = shm_path(key)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise NotFound(f"shared memory key '{key}' does not exist (no {path})") from None
    except PermissionError:
        raise InvalidArgument(f"shared memory key '{key}' cannot be opened read-write by the server") from None
    except OSError as err:
        if err.errno in (errno.EMFILE, errno.ENFILE):
            raise ResourceExhausted(
                f"cannot open shared memory key '{key}': {err.strerror}; unregister regions no longer used"
            ) from None
        raise InvalidArgument(f"shared memory key '{key}' cannot be opened: {err.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgument(f"shared memory key '{key}' is not a shared memory object (not a regular file)")
    return fd


class SharedMemoryRegion:
    """One registered window of a shared memory object, held open; see the module guarantees."""

    def __init__(self, name: str, key: str, offset: int, byte_size: int):
        if byte_size <= 0:
            shm_path(key)  # a bad key is the first thing to report
            raise InvalidArgument(f"shared memory region '{name}': byte_size must be positive, not {byte_size}")
        fd = _open_object(key)
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise InvalidArgument(
                    f"shared memory region '{name}': offset {offset} + byte_size {byte_size} "
                    f"= {offset + byte_size} is beyond the end of key '{key}' ({size} bytes)"
                )
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.name = name
        self.key = key
        self.offset = offset
        self.byte_size = byte_size

    def check_window(self, location: TensorLocation, tensor: str) -> None:
        """Refuse a window that does not fit in this region as registered."""
        if location.offset + location.byte_size > self.byte_size:
            raise InvalidArgument(
                f"{tensor}: shared_memory_offset {location.offset} + shared_memory_byte_size "
                f"{location.byte_size} is outside region '{self.name}' ({self.byte_size} bytes)"
            )

    def _usable(self, tensor: str) -> int:
        """The descriptor, once the object is known to still cover the registered window."""
        if self._fd < 0:
            raise NotFound(f"{tensor}: shared memory region '{self.name}' was unregistered while in use")
        size = os.fstat(self._fd).st_size
        if size < self.offset + self.byte_size:
            raise self._shrunk(tensor, size)
        return self._fd

    def _shrunk(self, tensor: str, size: int) -> InvalidArgument:
        return InvalidArgument(
            f"{tensor}: shared memory region '{self.name}' has shrunk: key '{self.key}' is now {size} bytes "
            f"but the region was registered as {self.byte_size} bytes at offset {self.offset}"
        )

    def read(self, location: TensorLocation, tensor: str) -> bytes:
        """A copy of the ``location.byte_size`` bytes at ``location.offset`` of this region."""
        self.check_window(location, tensor)
        fd = self._usable(tensor)
        start = self.offset + location.offset
        parts = []
        done = 0
        while done < location.byte_size:
            part = os.pread(fd, min(location.byte_size - done, _MAX_TRANSFER), start + done)
            if not part:
                break
            parts.append(part)
            done += len(part)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(data) < location.byte_size:  # shrunk between fstat and pread
            raise self._shrunk(tensor, os.fstat(fd).st_size)
        return data

    def write(self, location: TensorLocation, data, tensor: str) -> None:
        """Write ``data`` (a bytes-like object, at most ``location.byte_size`` bytes) at ``location.offset``."""
        self.check_window(location, tensor)
        fd = self._usable(tensor)
        view = memoryview(data).cast("B")
        start = self.offset + location.offset
        done = 0
        while done < len(view):  # a shrink racing this write extends the object again: no signal either way
            done += os.pwrite(fd, view[done:done + _MAX_TRANSFER], start + done)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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

    def region(self, location: TensorLocation, tensor: str) -> SharedMemoryRegion:
        """The registered region ``location`` names, once the window is known to fit in it."""
        region = self._regions.get(location.region)
        if region is None:
            raise NotFound(f"{tensor}: shared memory region '{location.region}' is not registered")
        region.check_window(location, tensor)
        return region

    def read(self, location: TensorLocation, tensor: str) -> bytes:
        """A copy of the tensor's bytes; see ``SharedMemoryRegion.read``."""
        return self.region(location, tensor).read(location, tensor)

    def close(self) -> None:
        self.unregister()
