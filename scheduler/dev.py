"""``scheduler dev``: the single-host mesh in one command.

Starts, as child processes: a scheduler on the embedded SQLite store in
``--state-dir``, one node agent for this host — real NVML where there is a
GPU, otherwise the fake GPUs of ``--fake-gpus`` (default 1x24GiB), and it
says which — and the front proxy on ``--proxy-listen``. Then it applies
``examples/deployments/``, waits until the replicas are ready, prints them,
calls the examples through the proxy with the client library (a unary call
and a streaming one), and keeps running until Ctrl-C or SIGTERM, when it
stops the proxy, the agent (which drains its replicas) and the scheduler.

Metrics are on (``--no-metrics`` turns them off): the scheduler, the agent
and the proxy serve Prometheus GET /metrics on loopback ports of their own
(port 0), the replicas' are re-exported by the agent; the URLs are printed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

from meshserve.common.listen import ListenError, listen_socket
from meshserve.common.ready_line import parse_metrics_address, parse_ready_line
from meshserve.common.security.tls import TlsConfig, without_tls_environment
from meshserve.node_agent.policy import development_policy_yaml

from .state_lock import StateDirBusy, hold_state_dir

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_FAKE_GPUS = "1x24GiB"
DEV_POLICY_NAME = "dev-policy.yaml"
# Loading the examples (onnxruntime, the n-gram model) takes seconds on a small machine.
READY_TIMEOUT_S = 120.0
# The proxy learns of ready replicas from the scheduler's route watch within moments.
ROUTES_TIMEOUT_S = 30.0
METRICS_ARGS = ["--metrics-listen", "127.0.0.1:0"]
# Daemon name -> its metrics address, as its output announces it (common/ready_line.py).
metrics_addresses: dict[str, str] = {}


def _note_metrics(name: str, line: str) -> None:
    address = parse_metrics_address(line)
    if address is not None:
        metrics_addresses.setdefault(name, address)


def _write_dev_policy(state_dir: pathlib.Path) -> str:
    """The agent's host policy for the dev mesh, rewritten each start: the examples' repositories only."""
    path = state_dir / DEV_POLICY_NAME
    path.write_text(development_policy_yaml(REPO_ROOT / "examples"), encoding="utf-8")
    return str(path)
def _child_env() -> dict[str, str]:
    """Every process of the dev mesh is plaintext on loopback, whatever MESHSERVE_TLS_* the shell has."""
    return without_tls_environment(os.environ)


def _gpu_present() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def _start(args: list[str], name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=_child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _forward_output(process: subprocess.Popen, name: str) -> None:
    """Print a child's output with its name, for as long as it runs (a full pipe would block it)."""
    def forward():
        for line in process.stdout:
            _note_metrics(name, line)
            print(f"  {name} | {line.rstrip()}", flush=True)
    threading.Thread(target=forward, daemon=True, name=f"output-{name}").start()


def _wait_for_ready(process: subprocess.Popen, name: str) -> str:
    for line in process.stdout or ():   # a pipe (started with stdout=PIPE)
        print(f"  {name} | {line.rstrip()}", flush=True)
        _note_metrics(name, line)
        address = parse_ready_line(line, name)
        if address is not None:
            _forward_output(process, name)
            return address
    raise SystemExit(f"{name} exited with code {process.wait()} before it was ready")


def _ctl(server: str, *args: str) -> int:
    return subprocess.call([sys.executable, "-m", "meshserve.scheduler", "ctl", "--server", server, *args], cwd=REPO_ROOT,
                           env=_child_env())


def _replicas(server: str) -> list[dict]:
    output = subprocess.run([sys.executable, "-m", "meshserve.scheduler", "ctl", "--server", server, "-o", "json",
                             "get", "replicas"], cwd=REPO_ROOT, env=_child_env(), capture_output=True,
                            text=True).stdout
    try:
        return json.loads(output).get("replicas", [])
    except json.JSONDecodeError:
        return []


def _show_calls(proxy: str) -> None:
    """Call the examples through the proxy, as any client of the mesh would."""
    import numpy as np

    from meshserve.clients import InferenceClient, MeshError

    with InferenceClient(proxy, timeout=30, tls=TlsConfig()) as client:
        deadline = time.monotonic() + ROUTES_TIMEOUT_S
        while not (client.is_model_ready("add_sub") and client.is_model_ready("textgen")):
            if time.monotonic() > deadline:
                print("the proxy has no ready route for add_sub and textgen; skipping the calls")
                return
            time.sleep(0.2)  # the proxy follows the route table; nothing here to await
        try:
            a = np.arange(16, dtype=np.float32)[None, :]
            out = client.infer("add_sub", {"INPUT0": a, "INPUT1": np.ones_like(a)})
            print(f"\nadd_sub through the proxy {proxy}: INPUT0+1 = {out['OUTPUT0'][0, :6]}...")
            prompt = "The scheduler places"
            tokens = [r["TOKEN"][0].decode() for r in client.stream("textgen", {
                "PROMPT": np.array([prompt.encode()], dtype=object), "MAX_TOKENS": np.array([16], np.int32)})]
            print(f"textgen through the proxy (streamed): {prompt}{''.join(tokens)}")
        except MeshError as err:
            print(f"a call through the proxy failed: {type(err).__name__}: {err}")


def _settled(server: str) -> bool:
    """True once every replica is ready, has crashed at least once, or is pending with a reason."""
    replicas = _replicas(server)
    return bool(replicas) and all(
        r.get("state") == "ready" or int(r.get("restarts", 0)) > 0
        or (r.get("state") == "pending" and r.get("reason")) for r in replicas)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scheduler dev", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:7070", help="the scheduler's address")
    parser.add_argument("--proxy-listen", default="127.0.0.1:8001", help="the front proxy's address")
    parser.add_argument("--state-dir", default=str(REPO_ROOT / ".meshserve-dev"))
    parser.add_argument("--fake-gpus", default=None, help=f"fake GPUs when none is present "
                        f"(default {DEFAULT_FAKE_GPUS}); ignored with a real GPU unless given")
    parser.add_argument("--deployments", default=str(REPO_ROOT / "examples" / "deployments"))
    parser.add_argument("--policy", help="the node agent's host policy file (default: one written to "
                        "STATE_DIR/dev-policy.yaml allowing the repositories under examples/)")
    parser.add_argument("--once", action="store_true", help="stop once the replicas are ready")
    parser.add_argument("--no-metrics", action="store_true",
                        help="no Prometheus /metrics endpoints (default: every daemon serves one on loopback)")
    args = parser.parse_args(argv)
    metrics = [] if args.no_metrics else METRICS_ARGS

    state_dir = pathlib.Path(args.state_dir)
    try:
        hold_state_dir(state_dir)  # held until this process exits
        for address in (args.listen, args.proxy_listen):
            listen_socket(address).close()  # a port in use: refuse before starting anything
    except (StateDirBusy, ListenError) as err:
        print(f"scheduler dev: {err}", file=sys.stderr, flush=True)
        return 1
    fake = args.fake_gpus or (None if _gpu_present() else DEFAULT_FAKE_GPUS)
    print(f"meshserve dev: state in {state_dir}; GPUs: "
          + (f"FAKE {fake} (no GPU on this host)" if fake and not args.fake_gpus else
             f"FAKE {fake} (--fake-gpus)" if fake else "real, through NVML"), flush=True)

    children: list[subprocess.Popen] = []

    def stop(*_):
        for child in reversed(children):  # the agent first: it drains its replicas
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(60)
                except subprocess.TimeoutExpired:
                    child.kill()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        scheduler = _start(["-m", "meshserve.scheduler", "serve", "--listen", args.listen,
                            "--store", f"sqlite:///{state_dir / 'state.db'}", "--id", "dev", *metrics], "scheduler")
        children.append(scheduler)
        address = _wait_for_ready(scheduler, "scheduler")
        agent_args = ["-m", "meshserve.node_agent", "--scheduler", address, "--name", socket.gethostname(),
                      "--state-dir", str(state_dir / "node-agent"),
                      "--policy", args.policy or _write_dev_policy(state_dir), *metrics]
        if fake:
            agent_args += ["--fake-gpus", fake]
        agent = _start(agent_args, "node-agent")
        children.append(agent)
        _forward_output(agent, "node-agent")
        proxy_process = _start(["-m", "meshserve.proxy", "--scheduler", address, "--listen", args.proxy_listen,
                               *metrics], "proxy")
        children.insert(0, proxy_process)  # stopped last: it keeps serving while replicas drain
        proxy = _wait_for_ready(proxy_process, "proxy")
        for path in sorted(pathlib.Path(args.deployments).glob("*.yaml")):
            _ctl(address, "apply", "-f", str(path))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and not _settled(address):
            time.sleep(1.0)  # polling another process's state: there is no event to await
        _ctl(address, "get", "nodes")
        _ctl(address, "get", "replicas")
        _show_calls(proxy)
        if metrics:
            print("\nmetrics (Prometheus text; the node agent's include its replicas'):", flush=True)
            for name in ("scheduler", "node-agent", "proxy"):
                address = metrics_addresses.get(name)
                print(f"  {name}: " + (f"http://{address}/metrics" if address else "not announced"), flush=True)
        if not args.once:
            print(f"\nmesh running: clients use the proxy at {proxy} (KServe v2 gRPC); operators "
                  f"`scheduler ctl --server {address} get replicas`; Ctrl-C to stop", flush=True)
            while all(child.poll() is None for child in children):
                time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            stop()
        except SystemExit:
            pass
    return 0
