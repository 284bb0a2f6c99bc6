"""Giving the heap that large requests freed back to the operating system.

glibc's malloc keeps what a thread frees in that thread's arena for reuse.
gRPC receives a large message in many chunks on its own threads, so after a
refused 64 MiB request the freed chunks stay resident: the replica sits one
to three message sizes above where it was (more as arenas multiply), though
nothing holds the memory any more. Only ``malloc_trim`` hands it back.

Guarantee: while running, a ``HeapTrimmer`` looks every ``CHECK_INTERVAL_S``
and calls ``malloc_trim(0)`` in a thread (milliseconds for hundreds of MiB;
the event loop never waits for it) when either

- the allocator's free memory (``mallinfo2``) grew by ``GROWTH_BYTES`` since
  the last trim: something large was freed, say a stream's queued messages
  (a trim leaves the chunks free, only their pages go back); or
- the resident size is ``GROWTH_BYTES`` over its floor, the lowest it has
  been: pages a trim returned were touched again, say by the next large
  request reusing freed chunks, which leaves the free total where it was.

A trim that returns little shows that what is resident is in use: that
becomes the floor, so a replica whose working set grew is not trimmed every
second. Memory in use is never touched. Without glibc 2.33 or later it does
nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

# A large request's memory goes back within about a second; looking costs microseconds.
CHECK_INTERVAL_S = 1.0
# Under this the allocator's reuse is worth more than the memory, and a trim is not worth its
# milliseconds; a single large request frees more.
GROWTH_BYTES = 32 * 1024 * 1024
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def _glibc_functions() -> tuple[Callable[[], _MallInfo2], Callable[[int], int]] | None:
    """glibc's ``mallinfo2`` and ``malloc_trim``, or None where the C library lacks them."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        info, trim = libc.mallinfo2, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    info.argtypes, info.restype = [], _MallInfo2
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return info, trim


def resident_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE_BYTES


class HeapTrimmer:
    """A background task returning the allocator's freed memory to the OS."""

    def __init__(self, interval_s: float = CHECK_INTERVAL_S, growth_bytes: int = GROWTH_BYTES):
        self.interval_s = interval_s
        self.growth_bytes = growth_bytes
        self._glibc = _glibc_functions() if os.path.exists("/proc/self/statm") else None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._glibc is None:
            log.debug("no mallinfo2/malloc_trim here: freed heap stays with the allocator")
            return
        self._task = asyncio.create_task(self._run(*self._glibc), name="heap-trim")

    async def _run(self, info: Callable[[], _MallInfo2], trim: Callable[[int], int]) -> None:
        def levels() -> tuple[int, int]:
            """(free bytes in the allocator, resident bytes)."""
            return info().fordblks, resident_bytes()

        loop = asyncio.get_running_loop()
        free_after, floor = levels()
        while True:
            await asyncio.sleep(self.interval_s)
            free, resident = levels()
            floor = min(floor, resident)
            if free - free_after < self.growth_bytes and resident - floor < self.growth_bytes:
                continue
            await loop.run_in_executor(None, trim, 0)
            free_after, after = levels()
            # Nothing much went back: what is resident is in use, the new floor (no trim a second).
            floor = after if resident - after < self.growth_bytes else min(floor, after)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
