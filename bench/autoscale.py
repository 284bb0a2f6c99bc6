"""Autoscaling under a load step, scale from zero, and a rollout under load, through the proxy.

    python -m bench.autoscale [--quick]

Starts a single-host mesh on loopback (scheduler on SQLite, one node agent
with fake GPUs, the proxy) serving ``sleeper`` (tests/models/serving: each
call sleeps 50 ms, two run at once per replica: a fixed per-call cost) with
``autoscaling: {min 1, max 6, target_in_flight 4}`` and windows shortened so
the run takes minutes. Closed-loop clients step c = 2 -> 16 -> 2. It prints
one JSON line:

- time from the step to the first added replica ready, and to the target
  count (16 / 4 = 4 replicas) ready;
- failed calls (goal 0), p99 before / during / after the step;
- scale from zero: the time from the first call at zero replicas to its
  answer, with its parts seen from the scheduler (placement: the replica
  record exists; process start: the agent reports it starting; model load:
  ready) and the proxy's forwarding after that;
- a rollout (a new revision) under c=4 load: failed calls (goal 0).

For comparison, as documented by the peers (not measured here): Knative's
KPA decides every 2 s over a 60 s stable / 6 s panic window and reports cold
starts of 8-18 s; Ray Serve waits ``upscale_delay_s`` 30 s (and 600 s to
scale down) with metrics over a 30 s look-back.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import numpy as np

from meshserve.clients import InferenceClient
from meshserve.common.errors import MeshError
from meshserve.node_agent.policy import development_policy_yaml
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc

from .servers import REPO_ROOT, RuntimeServer, stop_on_signals

SERVING = REPO_ROOT / "tests" / "models" / "serving"
DELAY_MS = 50
INPUTS = {"DELAY_MS": np.array([DELAY_MS], dtype=np.int32)}
TARGET_IN_FLIGHT = 4
STEP_HIGH = 16


def spec(name: str, *, min_replicas: int, scale_to_zero_after_s: float = 120.0, drain_delay_s: int = 2) -> str:
    return f"""kind: Deployment
name: {name}
model: {{repository: {SERVING}, name: sleeper}}
resources: {{gpus: 1, gpu_memory: 1GiB, cpu: 10m}}
runtime_args: [--drain-delay, "{drain_delay_s}"]
autoscaling:
  min_replicas: {min_replicas}
  max_replicas: 6
  target_in_flight: {TARGET_IN_FLIGHT}
  stable_window_s: 20
  panic_window_s: 2
  downscale_delay_s: 10
  scale_to_zero_after_s: {scale_to_zero_after_s}
"""


class Listening(RuntimeServer):
    """A daemon that prints a ready line, started and stopped like the runtime."""

    def __init__(self, args: list[str], name: str):
        super().__init__("", name=name)
        self.args = [sys.executable, *args]


class Background:
    """A process with no ready line (the node agent), in its own session; stop() ends its group."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


class Load:
    """Closed-loop clients through the proxy; ``set(c)`` changes how many call at once."""

    def __init__(self, address: str, max_workers: int = STEP_HIGH):
        self.address = address
        self.calls: list[tuple[float, float, bool]] = []   # (end time, latency, ok)
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._active = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(max_workers)]
        for thread in self._threads:
            thread.start()

    def set(self, workers: int) -> None:
        self._active = workers

    def _work(self, index: int) -> None:
        with InferenceClient(self.address, timeout=60) as client:
            while not self._stop.is_set():
                if index >= self._active:
                    time.sleep(0.02)
                    continue
                started = time.monotonic()
                try:
                    ok = client.infer("sleeper", INPUTS)["DONE_MS"].tolist() == [DELAY_MS]
                except MeshError as err:
                    ok = False
                    with self._lock:
                        self.errors.append(str(err)[:200])
                ended = time.monotonic()
                with self._lock:
                    self.calls.append((ended, ended - started, ok))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(70)

    def p99_ms(self, start: float, end: float) -> float | None:
        latencies = sorted(lat for t, lat, ok in self.calls if start <= t < end and ok)
        return round(float(np.percentile(latencies, 99)) * 1000, 1) if latencies else None

    def failed(self, start: float = 0.0, end: float = float("inf")) -> int:
        return sum(1 for t, _, ok in self.calls if start <= t < end and not ok)


class Admin:
    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.stub = mesh_grpc.AdminServiceStub(self.channel)

    def apply(self, text: str) -> None:
        self.stub.Apply(mesh.ApplyRequest(spec_yaml=text), timeout=10)

    def replicas(self, name: str) -> list[mesh.Replica]:
        return [r for r in self.stub.Get(mesh.GetRequest(kind="replicas"), timeout=10).replicas if r.deployment == name]

    def deployment(self, name: str) -> mesh.Deployment:
        return self.stub.Get(mesh.GetRequest(kind="deployments", name=name), timeout=10).deployments[0]

    def ready(self, name: str) -> int:
        return sum(1 for r in self.replicas(name) if r.state == "ready")

    def wait(self, predicate, what: str, timeout: float = 180.0, every: float = 0.1) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if predicate():
                return time.monotonic()
            time.sleep(every)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def policy_file(directory: str) -> str:
    path = os.path.join(directory, "policy.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(development_policy_yaml(SERVING))
    return path


def load_step(admin: Admin, load: Load, quick: bool) -> dict:
    before_s, high_s, after_s = (8, 25, 30) if quick else (15, 45, 45)
    load.set(2)
    time.sleep(before_s)
    step = time.monotonic()
    load.set(STEP_HIGH)
    first = admin.wait(lambda: admin.ready("sleepy") >= 2, "a second ready replica")
    target = admin.wait(lambda: admin.ready("sleepy") >= STEP_HIGH // TARGET_IN_FLIGHT, "the target count")
    time.sleep(max(0.0, step + high_s - time.monotonic()))
    down = time.monotonic()
    load.set(2)
    settled = admin.wait(lambda: admin.deployment("sleepy").replicas == 1 and admin.ready("sleepy") == 1,
                         "back to 1 replica", timeout=after_s + 120)
    end = max(settled, down + after_s)
    time.sleep(max(0.0, end - time.monotonic()))
    return {
        "first_replica_added_s": round(first - step, 2),
        "target_reached_s": round(target - step, 2),
        "back_to_min_after_s": round(settled - down, 2),
        "failed_calls": load.failed(),
        "p99_ms": {"before": load.p99_ms(step - before_s, step), "during": load.p99_ms(target, down),
                   "after": load.p99_ms(settled, time.monotonic())},
    }


def cold_start(admin: Admin, proxy: str) -> dict:
    # The proxy routes by model: "sleepy" serves sleeper too, so it goes first.
    admin.stub.Delete(mesh.DeleteRequest(kind="deployments", name="sleepy"), timeout=10)
    admin.wait(lambda: not admin.replicas("sleepy"), "sleepy gone", timeout=120)
    admin.apply(spec("napper", min_replicas=0, scale_to_zero_after_s=3))
    admin.wait(lambda: admin.deployment("napper").replicas == 0 and not admin.replicas("napper"),
               "napper at zero replicas", timeout=120)
    marks: dict[str, float] = {}

    def watch() -> None:
        while "ready" not in marks:
            replicas = admin.replicas("napper")
            if replicas:
                marks.setdefault("placed", time.monotonic())
                if any(r.pid for r in replicas):
                    marks.setdefault("started", time.monotonic())
                if any(r.state == "ready" for r in replicas):
                    marks.setdefault("ready", time.monotonic())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    with InferenceClient(proxy, timeout=120, retries=0) as client:
        called = time.monotonic()
        watcher.start()
        ok = client.infer("sleeper", INPUTS)["DONE_MS"].tolist() == [DELAY_MS]
        answered = time.monotonic()
    watcher.join(5)
    parts = {"placement_s": marks.get("placed", answered) - called,
             "process_start_s": marks.get("started", answered) - marks.get("placed", called),
             "model_load_s": marks.get("ready", answered) - marks.get("started", called),
             "forward_s": answered - marks.get("ready", called)}
    return {"first_call_s": round(answered - called, 2), "ok": ok,
            "parts": {key: round(value, 2) for key, value in parts.items()}}


def rollout_under_load(admin: Admin, load: Load) -> dict:
    load.set(4)
    time.sleep(3)
    start = time.monotonic()
    revision = admin.deployment("sleepy").revision
    admin.apply(spec("sleepy", min_replicas=1, drain_delay_s=1))   # a new revision
    admin.wait(lambda: admin.deployment("sleepy").revision == revision + 1
               and all(r.revision == revision + 1 and r.state == "ready" for r in admin.replicas("sleepy"))
               and admin.replicas("sleepy"), "the new revision everywhere")
    time.sleep(2)
    return {"duration_s": round(time.monotonic() - start, 2), "failed_calls": load.failed(start)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases")
    args = parser.parse_args(argv)
    stop_on_signals()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-autoscale-") as tmp:
        scheduler = Listening(["-m", "meshserve.scheduler", "serve", "--listen", "127.0.0.1:0",
                               "--store", f"sqlite:///{tmp}/state.db", "--id", "bench",
                               "--report-interval", "0.3", "--heartbeat-timeout", "3"], "scheduler")
        agent = proxy = load = None
        try:
            address = scheduler.start()
            agent = Background(["-m", "meshserve.node_agent", "--scheduler", address, "--name", "bench-node",
                                "--fake-gpus", "8x80GiB", "--host", "127.0.0.1", "--state-dir", f"{tmp}/agent",
                                "--policy", policy_file(tmp)])
            proxy = Listening(["-m", "meshserve.proxy", "--scheduler", address, "--listen", "127.0.0.1:0"],
                              "proxy")
            proxy_address = proxy.start()
            admin = Admin(address)
            admin.apply(spec("sleepy", min_replicas=1))
            admin.wait(lambda: admin.ready("sleepy") == 1, "the first replica", timeout=120)
            load = Load(proxy_address)
            step = load_step(admin, load, args.quick)
            rollout = rollout_under_load(admin, load)
            load.set(0)
            cold = cold_start(admin, proxy_address)
        finally:
            if load is not None:
                load.stop()
            for process in (proxy, agent, scheduler):
                if process is not None:
                    process.stop()
    result = {"benchmark": "autoscale", "model": f"sleeper {DELAY_MS} ms/call, 2 at once per replica",
              "target_in_flight": TARGET_IN_FLIGHT, "step": f"c=2 -> {STEP_HIGH} -> 2", **step,
              "rollout_under_load": rollout, "cold_start": cold,
              "goal": {"failed_calls": 0, "met": step["failed_calls"] == 0 and rollout["failed_calls"] == 0
                       and cold["ok"]},
              "cpus": os.cpu_count(), "wall_s": round(time.monotonic() - started, 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
