"""systemd's notify protocol: one AF_UNIX datagram to ``$NOTIFY_SOCKET`` per state change.

Written here rather than taken as a dependency: the protocol is a few lines
(newline-separated ``KEY=VALUE`` assignments in one datagram; a socket path
starting with ``@`` is in the abstract namespace), and the packages that wrap
it are either unmaintained or pull in libsystemd.

Guarantees:
- Without ``NOTIFY_SOCKET`` (not started by systemd with ``Type=notify``)
  every call does nothing and returns False: daemons call it unconditionally.
- A message is never longer than one datagram and never carries a newline
  inside a value (a STATUS text is flattened to one line), so a caller
  cannot inject another assignment.
- Sending never blocks the event loop and never raises: a missing or full
  socket is logged once and reported as False.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Mapping

log = logging.getLogger(__name__)

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"
# systemd reads at most this much of a STATUS; longer texts are cut, not refused.
MAX_STATUS_CHARS = 1024


def _address(path: str) -> str | bytes:
    """A socket path from the environment; "@name" is the abstract namespace (a leading NUL)."""
    return b"\0" + path[1:].encode() if path.startswith("@") else path


def _one_line(value: object, limit: int) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Notifier:
    """Sends state to systemd; one per process. ``env`` is read once (tests pass their own)."""

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        self.path = env.get(ENV_SOCKET, "")
        self._socket: socket.socket | None = None
        self._warned = False
        watchdog_pid = env.get(ENV_WATCHDOG_PID)
        usec = env.get(ENV_WATCHDOG_USEC, "")
        ours = watchdog_pid is None or watchdog_pid == str(os.getpid())
        # How often to send WATCHDOG=1: half of systemd's WatchdogSec when it watches this process, else None.
        self.watchdog_interval_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and ours else None

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` assignments (``ready=1`` becomes ``READY=1``); True when sent."""
        if not self.path:
            return False
        lines = []
        for key, value in fields.items():
            name = key.upper()
            limit = MAX_STATUS_CHARS if name == "STATUS" else 256
            lines.append(f"{name}={_one_line(value, limit)}")
        return self._send("\n".join(lines).encode())

    def ready(self, status: str = "") -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self, extend_timeout_s: float | None = None) -> bool:
        """STOPPING=1, and with ``extend_timeout_s`` EXTEND_TIMEOUT_USEC: a drain that needs longer."""
        fields: dict[str, object] = {"STOPPING": 1}
        if extend_timeout_s is not None:
            fields["EXTEND_TIMEOUT_USEC"] = int(extend_timeout_s * 1e6)
        return self.notify(**fields)

    def _send(self, message: bytes) -> bool:
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(message, _address(self.path))
            return True
        except OSError as err:
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.path, err)
                self._warned = True
            return False

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


async def announce(notifier: Notifier, readiness: Awaitable[str]) -> None:
    """READY=1 with ``readiness``'s result as STATUS once it completes, then WATCHDOG=1 from the event loop
    every ``watchdog_interval_s`` (a blocked loop stops the pings, and systemd restarts the unit) until
    cancelled. Run it as a task beside the daemon; does nothing but await ``readiness`` without systemd."""
    status = await readiness
    notifier.ready(status)
    if notifier.watchdog_interval_s is None:
        return
    while True:
        await asyncio.sleep(notifier.watchdog_interval_s)
        notifier.watchdog()
