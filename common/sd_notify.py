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
- ``announce`` pings the watchdog from the event loop itself (a task that
  sleeps between pings), never from a thread: a blocked loop stops the
  pings. Its STATUS line is sent again only when it changes.
- ``draining`` sends STOPPING=1 and then, until the drain ends, STATUS and
  EXTEND_TIMEOUT_USEC again every third of a window from the event loop: a
  drain that makes progress is given time, one whose loop is stuck is not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

log = logging.getLogger(__name__)

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"
# systemd reads at most this much of a STATUS; longer texts are cut, not refused.
MAX_STATUS_CHARS = 1024
# How often a changed STATUS line is sent (an operator reads it in `systemctl status`).
STATUS_INTERVAL_S = 2.0
# During a drain, each EXTEND_TIMEOUT_USEC gives this long until the next one (sent every third of it).
DRAIN_WINDOW_S = 15.0


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


async def announce(notifier: Notifier, readiness: Awaitable[str], status: Callable[[], str] | None = None) -> None:
    """READY=1 with ``readiness``'s result as STATUS once it completes; then, until cancelled, WATCHDOG=1 from
    the event loop every ``watchdog_interval_s`` (a blocked loop stops the pings, and systemd restarts the unit)
    and ``status()`` as STATUS whenever it changes (looked at every ``STATUS_INTERVAL_S``). Run it as a task
    beside the daemon; without systemd it only awaits ``readiness``."""
    last = await readiness
    notifier.ready(last)
    watchdog = notifier.watchdog_interval_s
    if not notifier.enabled or (watchdog is None and status is None):
        return
    loop = asyncio.get_running_loop()
    tick = min(watchdog or STATUS_INTERVAL_S, STATUS_INTERVAL_S)
    next_ping = loop.time() + (watchdog or 0.0)
    while True:
        await asyncio.sleep(tick)
        if watchdog is not None and loop.time() >= next_ping - tick / 2:
            notifier.watchdog()
            next_ping = loop.time() + watchdog
        if status is not None:
            last = _send_if_changed(notifier, status, last)


def _send_if_changed(notifier: Notifier, status: Callable[[], str], last: str) -> str:
    try:
        text = status()
    except Exception:   # a status line must never take the watchdog down with it
        log.exception("the systemd STATUS line could not be made")
        return last
    if text != last:
        notifier.status(text)
    return text


@asynccontextmanager
async def draining(notifier: Notifier, status: Callable[[], str],
                   window_s: float = DRAIN_WINDOW_S) -> AsyncIterator[None]:
    """Around a daemon's drain: STOPPING=1 with ``status()`` and EXTEND_TIMEOUT_USEC=``window_s`` at once, then
    both again every ``window_s / 3`` until the block ends (see the module's guarantees)."""
    if not notifier.enabled:
        yield
        return

    def extend() -> None:
        notifier.notify(STATUS=_safe(status), EXTEND_TIMEOUT_USEC=int(window_s * 1e6))

    notifier.notify(STOPPING=1, STATUS=_safe(status), EXTEND_TIMEOUT_USEC=int(window_s * 1e6))

    async def keep_extending() -> None:
        while True:
            await asyncio.sleep(window_s / 3)
            extend()

    task = asyncio.create_task(keep_extending(), name="systemd drain")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _safe(status: Callable[[], str]) -> str:
    try:
        return status()
    except Exception:
        log.exception("the systemd STATUS line could not be made")
        return "stopping"
