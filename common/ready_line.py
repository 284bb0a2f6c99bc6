"""The line each daemon prints on stdout once it serves: ``meshserve COMPONENT ... listening on HOST:PORT``.

Printed by the runtime, the scheduler and the proxy, and read by whatever
started them (a node agent reads its replicas' lines; ``scheduler dev``, the
tests and the benchmarks read the daemons'). It carries the bound address,
so a daemon started on port 0 tells its parent which port it got. One module
prints and parses it so the two sides cannot drift.
"""

from __future__ import annotations

import asyncio
import re
import signal

_PATTERN = re.compile(r"^meshserve (?P<component>[\w-]+)\b.*? listening on (?P<address>\S+:\d+)")


def ready_line(component: str, address: str, detail: str = "") -> str:
    """The line ``component`` prints once it serves on ``address``; ``detail`` follows the address."""
    return f"meshserve {component} listening on {address}{detail}"


def print_ready_line_until_signalled(component: str, address: str, detail: str = "") -> asyncio.Event:
    """Print the ready line (flushed: the parent is waiting for it); the event is set on SIGTERM or SIGINT.

    The handlers are installed before the line is printed: whoever reads it may
    signal at once, and that signal must reach the daemon's drain. Call it from
    the running event loop.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(ready_line(component, address, detail), flush=True)
    return stop


def parse_ready_line(line: str, component: str | None = None) -> str | None:
    """The address a ready line announces, or None when ``line`` is not one (of ``component``, if given)."""
    match = _PATTERN.match(line.strip())
    if match is None or (component is not None and match["component"] != component):
        return None
    return match["address"]


_METRICS = re.compile(r"metrics on http://(?P<address>[^/\s]+:\d+)/metrics")


def metrics_detail(address: str | None) -> str:
    """What a daemon with ``--metrics-listen`` adds to its ready line: `` (metrics on http://ADDR/metrics)``."""
    return f" (metrics on http://{address}/metrics)" if address else ""


def parse_metrics_address(line: str) -> str | None:
    """The metrics address a ready line announces (``metrics_detail``), or None."""
    match = _METRICS.search(line)
    return match["address"] if match else None
