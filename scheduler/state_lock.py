"""One ``scheduler dev`` per state directory: an exclusive ``flock`` on ``STATE_DIR/dev.lock``.

Guarantees:
- ``hold_state_dir`` either returns the held lock or raises ``StateDirBusy``
  naming the directory and the holder's pid, having changed nothing: the
  lock file is opened without truncation and written only once the lock is
  ours.
- The kernel releases the lock when its holder exits, however it exits
  (a crash or SIGKILL leaves no stale lock to clean up by hand).
"""

from __future__ import annotations

import fcntl
import os
import pathlib

LOCK_NAME = "dev.lock"


class StateDirBusy(RuntimeError):
    """Another process holds the state directory."""


class StateDirLock:
    """A held lock; ``release()`` (or process exit) frees it."""

    def __init__(self, path: pathlib.Path, fd: int):
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1


def hold_state_dir(state_dir: pathlib.Path) -> StateDirLock:
    """Take the state directory for this process (created if missing); ``StateDirBusy`` if taken."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise StateDirBusy(f"state directory {state_dir} is in use by another `scheduler dev` "
                           f"(pid {holder}); stop it or pass another --state-dir") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateDirLock(path, fd)
