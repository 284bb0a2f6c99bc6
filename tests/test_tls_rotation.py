"""Certificates rotated on disk are used without a restart: real processes, real handshakes.

A running ``python -m meshserve.runtime``, ``mesh-proxy`` and ``scheduler serve`` get their
certificate, key and CA bundle replaced (renamed over) by ones from a new
CA: a new client trusting the new CA is served, one trusting only the old
CA is refused, a connection opened before the rotation keeps working, and
the process never restarts.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format
from mesh_harness import Process
from test_proxy_helpers import route
from tls_pki import Pki

from meshserve.clients import InferenceClient, Unavailable
from meshserve.common.security.tls import CertificateReloader, TlsConfig, as_flags
from meshserve.protos.mesh import control_pb2 as mesh

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples" / "models"
CALL_TIMEOUT_S = 10.0   # bounds a hung call; a refused handshake fails in milliseconds
CTL_TIMEOUT_S = 60.0    # a ctl process: Python start-up on a loaded machine


def _replace(source: pathlib.Path, target: pathlib.Path) -> None:
    """Install ``source`` at ``target`` the way an operator should: a copy renamed over the old file."""
    tmp = target.with_name(target.name + ".new")
    shutil.copyfile(source, tmp)
    os.chmod(tmp, 0o600)
    os.replace(tmp, target)


class ServingFiles:
    """The fixed paths a server is started with; ``install(pki, name, role)`` puts a new CA's files there."""

    def __init__(self, folder: pathlib.Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.cert, self.key, self.ca = folder / "server.pem", folder / "server-key.pem", folder / "ca.pem"

    def install(self, pki: Pki, name: str, role: str) -> None:
        files = pki.issue(name, role)
        _replace(files.key, self.key)
        _replace(files.cert, self.cert)
        _replace(pathlib.Path(pki.ca), self.ca)

    def flags(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca),
                "--tls-require-client-cert"]


def _add_sub(client: InferenceClient) -> float:
    a = np.arange(16, dtype=np.float32)[None, :]
    return float(client.infer("add_sub", {"INPUT0": a, "INPUT1": np.ones_like(a)})["OUTPUT0"][0, 0])


def _client(address: str, tls: TlsConfig) -> InferenceClient:
    return InferenceClient(address, tls=tls, timeout=CALL_TIMEOUT_S, retries=0)


def test_runtime_serves_certificates_from_a_new_ca_without_restart(tmp_path):
    old, new = Pki(tmp_path / "old-ca"), Pki(tmp_path / "new-ca")
    serving = ServingFiles(tmp_path / "serving")
    serving.install(old, "node-a", "agent")
    runtime = Process("runtime", ["-m", "meshserve.runtime", "--model-repository", str(EXAMPLES), "--model", "add_sub",
                                  "--listen", "127.0.0.1:0", "--event-loop", "asyncio", *serving.flags()])
    try:
        address = runtime.wait_listening()
        with _client(address, old.tls("client-1")) as before:
            assert _add_sub(before) == 1.0

            serving.install(new, "node-a", "agent")

            with _client(address, new.tls("client-1")) as after:
                assert _add_sub(after) == 1.0                   # the new CA's client: served
            with _client(address, old.tls("client-2")) as stale, pytest.raises(Unavailable):
                _add_sub(stale)                                 # only the old CA: refused now
            assert _add_sub(before) == 1.0                      # a connection from before keeps its session
        assert runtime.proc.poll() is None                      # the same process all along
        assert "reloaded from disk" in "".join(runtime.output)
    finally:
        runtime.stop()


def test_proxy_serves_certificates_from_a_new_ca_while_calls_keep_succeeding(tmp_path):
    old, new = Pki(tmp_path / "old-ca"), Pki(tmp_path / "new-ca")
    replica_tls = old.tls("node-a", "agent", require_client_cert=True)
    serving = ServingFiles(tmp_path / "serving")
    serving.install(old, "proxy-1", "proxy")
    runtime = Process("runtime", ["-m", "meshserve.runtime", "--model-repository", str(EXAMPLES), "--model", "add_sub",
                                  "--listen", "127.0.0.1:0", "--event-loop", "asyncio", *as_flags(replica_tls)])
    proxy = None
    try:
        routes = tmp_path / "routes.pbtxt"
        routes.write_text(text_format.MessageToString(mesh.RouteTable(version=1, routes=[
            route("add_sub", ("r1", runtime.wait_listening()))])))
        proxy = Process("proxy", ["-m", "meshserve.proxy", "--routes-file", str(routes), "--listen", "127.0.0.1:0",
                                  "--event-loop", "asyncio", *serving.flags()])
        address = proxy.wait_listening()
        with _client(address, old.tls("client-1")) as before:
            assert _add_sub(before) == 1.0

            serving.install(new, "proxy-1", "proxy")

            assert _add_sub(before) == 1.0                      # calls on the open connection go on
            with _client(address, new.tls("client-1")) as after:
                assert _add_sub(after) == 1.0                   # new CA at the front; the replica hop unchanged
            with _client(address, old.tls("client-2")) as stale, pytest.raises(Unavailable):
                _add_sub(stale)
        assert proxy.proc.poll() is None
    finally:
        for process in (proxy, runtime):
            if process is not None:
                process.stop()


def _ctl(address: str, tls: TlsConfig, *args: str) -> subprocess.CompletedProcess:
    flags = ["--tls-ca", tls.ca] + (["--tls-cert", tls.cert, "--tls-key", tls.key] if tls.cert else [])
    return subprocess.run([sys.executable, "-m", "meshserve.scheduler", "ctl", "--server", address, *flags, "-o", "json",
                           *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=CTL_TIMEOUT_S)


def test_scheduler_serves_certificates_from_a_new_ca_without_restart(tmp_path):
    old, new = Pki(tmp_path / "old-ca"), Pki(tmp_path / "new-ca")
    serving = ServingFiles(tmp_path / "serving")
    serving.install(old, "scheduler-1", "scheduler")
    scheduler = Process("scheduler", ["-m", "meshserve.scheduler", "serve", "--listen", "127.0.0.1:0", "--store",
                                      f"sqlite:///{tmp_path / 'state.db'}", "--id", "s1", *serving.flags()])
    try:
        address = scheduler.wait_listening()
        before = _ctl(address, old.tls("admin-1", "admin"), "get", "nodes")
        assert before.returncode == 0, before.stderr
        assert json.loads(before.stdout)["nodes"] == []

        serving.install(new, "scheduler-1", "scheduler")

        after = _ctl(address, new.tls("admin-1", "admin"), "get", "nodes")
        assert after.returncode == 0, after.stderr
        stale = _ctl(address, old.tls("admin-2", "admin"), "get", "nodes")
        assert stale.returncode == 3 and "TLS handshake failed" in stale.stderr and "Traceback" not in stale.stderr
        assert scheduler.proc.poll() is None
    finally:
        scheduler.stop()


def test_a_half_written_pair_is_not_used_until_it_is_whole(tmp_path):
    old, new = Pki(tmp_path / "old-ca"), Pki(tmp_path / "new-ca")
    serving = ServingFiles(tmp_path / "serving")
    serving.install(old, "node-a", "agent")
    reloader = CertificateReloader(str(serving.cert), str(serving.key), str(serving.ca))
    assert reloader() is None                                   # nothing changed: no new configuration

    fresh = new.issue("node-a", "agent")
    _replace(fresh.cert, serving.cert)                          # the certificate first, the key not yet
    assert reloader() is None and reloader.reloads == 0
    _replace(fresh.key, serving.key)
    assert reloader() is not None and reloader.reloads == 1     # the whole pair: used
    assert reloader() is None
