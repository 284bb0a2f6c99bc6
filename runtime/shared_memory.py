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
- Only real POSIX shared memory objects: the key's file is opened with
  ``O_NOFOLLOW`` (a symlink is refused, even one into ``/dev/shm``) and must
  be a regular file with one link on the ``/dev/shm`` file system (a hard
  link to another file, or something mounted over the name, is refused).
- ``read`` either returns exactly ``byte_size`` bytes of a registered
  region, or raises: ``NotFound`` for an unknown region, ``InvalidArgument``
  naming offset and size when the window falls outside, or naming the region
  when it has shrunk.

Clients: a region belongs to the client that registered it (its owner: its
authenticated identity when the server has one, else its connection;
``runtime.shm_scope``). Another client cannot name it in a request, see it
in a status, or unregister it: to everyone else it does not exist
(``NotFound``). A region registered over a connection is released when that
connection closes (``release_closed_connections``, run every second by
``runtime.shared_memory_janitor`` and before any quota refusal). Quotas: at
most ``MAX_REGIONS_PER_CLIENT`` regions and ``MAX_BYTES_PER_CLIENT`` bytes per
client and ``MAX_REGIONS`` in all; past one, registering answers
``ResourceExhausted``. With ``--shared-memory none`` registering answers
``FailedPrecondition``.

Opening a tmpfs object, ``fstat`` and a read or write of a tensor are a few
system calls plus a memcpy, cheap enough for the event loop.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from meshserve.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from meshserve.common.runtime_options import (
    SHARED_MEMORY_FLAG,
    SHARED_MEMORY_MODES,
    SHARED_MEMORY_NONE,
    SHARED_MEMORY_SYSTEM,
)

log = logging.getLogger(__name__)

# ``--shared-memory`` (common/runtime_options.py): whether the system shared memory extension is served.
FLAG = SHARED_MEMORY_FLAG
NONE, SYSTEM = SHARED_MEMORY_NONE, SHARED_MEMORY_SYSTEM
MODES = SHARED_MEMORY_MODES
# The owner of regions registered in-process (tests, library use): no gRPC client.
LOCAL_OWNER = ""
# A client registers a region per tensor it passes through shared memory and reuses them; 64 is
# room for an ensemble's inputs and outputs at a few requests in flight, and every region holds a
# file descriptor, so it bounds what one client makes the runtime keep open.
MAX_REGIONS_PER_CLIENT = 64
# The bytes one client's regions may span: far more than one request's tensors (256 MiB messages;
# shared memory exists to pass more), far less than a sparse object a client could claim to have.
MAX_BYTES_PER_CLIENT = 64 * 1024 ** 3
# Every client together: each region is a descriptor, and 1024 stays far below the usual limit
# (65,536) with room for connections and model files, however many connections clients open.
MAX_REGIONS = 1024

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
    problem = _not_a_shm_object(os.fstat(fd))
    if problem:
        os.close(fd)
        raise InvalidArgument(f"shared memory key '{key}' is not a shared memory object ({problem})")
    return fd


def _not_a_shm_object(info: os.stat_result) -> str:
    """Why an opened file is not a POSIX shared memory object of this host ("" when it is one).

    shm_open(3) makes a regular file with one link on the /dev/shm file system. A
    hard link planted there (to a file of the same file system) has two or more
    links; anything bind-mounted over a name lives on another device.
    """
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_nlink != 1:
        return f"{info.st_nlink} hard links"
    if info.st_dev != os.stat(SHM_DIRECTORY).st_dev:
        return f"not on the {SHM_DIRECTORY} file system"
    return ""


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
        self.connection = None   # the registering connection (SharedMemoryRegistry), None: no connection
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
    """The regions registered with one server, by client and name; see "Clients" in the module docstring.

    ``owner`` names the client a call comes from (``runtime.shm_scope``); the
    default, ``LOCAL_OWNER``, is in-process use. ``connection`` is the
    registering connection's key (``runtime.peer_connections.peer_key``), or
    None for a region that lives until it is unregistered.
    """

    def __init__(self, enabled: bool = True, *, max_regions_per_client: int = MAX_REGIONS_PER_CLIENT,
                 max_bytes_per_client: int = MAX_BYTES_PER_CLIENT, max_regions: int = MAX_REGIONS):
        self.enabled = enabled
        self.max_regions_per_client = max_regions_per_client
        self.max_bytes_per_client = max_bytes_per_client
        self.max_regions = max_regions
        self._regions: dict[str, dict[str, SharedMemoryRegion]] = {}   # owner -> name -> region
        self._count = 0
        # Returns the keys of the connections still open, None if unknown (runtime.peer_connections).
        self._open_connections: Callable[[], frozenset | None] | None = None

    def track_connections(self, open_connections: Callable[[], frozenset | None]) -> None:
        """Release a region once the connection that registered it is no longer among ``open_connections()``."""
        self._open_connections = open_connections

    def __len__(self) -> int:
        return self._count

    def register(self, name: str, key: str, offset: int, byte_size: int, *, owner: str = LOCAL_OWNER,
                 connection=None) -> None:
        if not self.enabled:
            raise FailedPrecondition(f"system shared memory is disabled on this runtime "
                                     f"(it was started with {FLAG} {NONE})")
        if not name:
            raise InvalidArgument("a shared memory region needs a name")
        regions = self._regions.get(owner, {})
        if name in regions:
            raise AlreadyExists(f"shared memory region '{name}' is already registered")
        self._check_quota(owner, byte_size)
        region = SharedMemoryRegion(name, key, offset, byte_size)
        region.connection = connection
        self._regions.setdefault(owner, {})[name] = region
        self._count += 1

    def _check_quota(self, owner: str, byte_size: int) -> None:
        """ResourceExhausted past a quota, once the regions of closed connections are released."""
        for attempt in range(2):
            regions = self._regions.get(owner, {})
            used = sum(region.byte_size for region in regions.values())
            problem = None
            if len(regions) >= self.max_regions_per_client:
                problem = (f"this client already has {len(regions)} shared memory regions registered, "
                           f"the most one client may have")
            elif used + max(byte_size, 0) > self.max_bytes_per_client:
                problem = (f"registering {byte_size} more bytes would give this client {used + byte_size} bytes "
                           f"of shared memory regions, over its {self.max_bytes_per_client}")
            elif self._count >= self.max_regions:
                problem = f"this runtime already holds {self._count} shared memory regions, the most it will hold"
            if problem is None:
                return
            if attempt == 0 and self.release_closed_connections():
                continue
            raise ResourceExhausted(f"{problem}; unregister regions no longer used")

    def unregister(self, name: str = "", *, owner: str = LOCAL_OWNER) -> None:
        """Unregister the client's region ``name``, or every region of the client when ``name`` is
        empty. Unknown names are no error (as in Triton: unregistering is idempotent)."""
        regions = self._regions.get(owner)
        if not regions:
            return
        for each in [name] if name else list(regions):
            region = regions.pop(each, None)
            if region is not None:
                region.close()
                self._count -= 1
        if not regions:
            del self._regions[owner]

    def status(self, name: str = "", *, owner: str = LOCAL_OWNER) -> list[SharedMemoryRegion]:
        """The client's region ``name`` (NotFound if it has none of that name), or all of its regions."""
        regions = self._regions.get(owner, {})
        if not name:
            return list(regions.values())
        region = regions.get(name)
        if region is None:
            raise NotFound(f"shared memory region '{name}' is not registered")
        return [region]

    def region(self, location: TensorLocation, tensor: str, *, owner: str = LOCAL_OWNER) -> SharedMemoryRegion:
        """The client's region ``location`` names, once the window is known to fit in it."""
        region = self._regions.get(owner, {}).get(location.region)
        if region is None:
            raise NotFound(f"{tensor}: shared memory region '{location.region}' is not registered")
        region.check_window(location, tensor)
        return region

    def read(self, location: TensorLocation, tensor: str, *, owner: str = LOCAL_OWNER) -> bytes:
        """A copy of the tensor's bytes; see ``SharedMemoryRegion.read``."""
        return self.region(location, tensor, owner=owner).read(location, tensor)

    def client(self, owner: str) -> ClientRegions:
        """The regions one client may name in its requests (what ``decode_request`` is given)."""
        return ClientRegions(self, owner)

    def release_closed_connections(self) -> int:
        """Unregister every region whose registering connection has closed; how many went."""
        if self._open_connections is None or not self._count:
            return 0
        open_now = self._open_connections()
        if open_now is None:
            return 0
        released = 0
        for owner in list(self._regions):
            for name, region in list(self._regions[owner].items()):
                if region.connection is not None and region.connection not in open_now:
                    self.unregister(name, owner=owner)
                    released += 1
        if released:
            log.info("released %d shared memory region(s) of closed connections", released)
        return released

    def close(self) -> None:
        for owner in list(self._regions):
            self.unregister(owner=owner)


class ClientRegions:
    """One client's view of a registry: it finds only the regions that client registered."""

    def __init__(self, registry: SharedMemoryRegistry, owner: str):
        self._registry = registry
        self._owner = owner

    def region(self, location: TensorLocation, tensor: str) -> SharedMemoryRegion:
        return self._registry.region(location, tensor, owner=self._owner)

    def read(self, location: TensorLocation, tensor: str) -> bytes:
        return self._registry.read(location, tensor, owner=self._owner)
