"""Real control-plane processes on loopback for integration tests.

``Mesh`` starts schedulers (``python -m meshserve.scheduler serve``) and node agents
(``python -m meshserve.node_agent`` with fake GPUs), each in its own process group so
that killing a "host" takes its replicas with it, exactly as a dead machine
would. Everything started is stopped by ``close()``.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

import grpc

from meshserve.common.ready_line import parse_ready_line
from meshserve.node_agent.policy import development_policy_yaml
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples" / "models"
# Short so the failure tests run in seconds (the defaults are 1 s and 5 s), yet ten
# reports long, so a busy 2-core machine does not lose a node that is alive.
REPORT_INTERVAL_S = 0.3
HEARTBEAT_TIMEOUT_S = 3.0
ELECTION_TTL_S = 2
# Bounds of the waits below: generous for a loaded 2-core machine starting runtime processes.
START_TIMEOUT_S = 60.0
CONVERGE_TIMEOUT_S = 120.0
RPC_TIMEOUT_S = 10.0


class Process:
    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None):
        self.name = name
        self.args = args
        self.output: list[str] = []
        self._listening = threading.Event()
        self.address = ""
        self.proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            address = parse_ready_line(line)
            if address is not None and not self.address:
                self.address = address
                self._listening.set()

    def wait_listening(self) -> str:
        if not self._listening.wait(START_TIMEOUT_S):
            raise AssertionError(f"{self.name} did not start:\n{''.join(self.output[-40:])}")
        return self.address

    def kill_host(self) -> None:
        """kill -9 the process and everything in its process group (its replicas)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP this process alone (not its replicas): alive, holding its sockets, answering nothing."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.resume()  # a paused process would sit on SIGTERM until killed
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill_host()  # anything left in the group
        return self.proc.returncode


class Mesh:
    def __init__(self):
        self.processes: list[Process] = []
        self._files = tempfile.TemporaryDirectory(prefix="mesh-harness-")  # policies; agents' state dirs

    def scheduler(self, store_url: str, scheduler_id: str, wait_leading: bool = True,
                  listen: str = "127.0.0.1:0", extra_args: tuple[str, ...] = ()) -> Process:
        """``listen`` with a fixed port restarts a scheduler where its agents and proxies look for it."""
        process = Process(f"scheduler-{scheduler_id}", [
            "-m", "meshserve.scheduler", "serve", "--listen", listen, "--store", store_url, "--id", scheduler_id,
            "--report-interval", str(REPORT_INTERVAL_S), "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S),
            "--election-ttl", str(ELECTION_TTL_S), "--log-level", "INFO",
            # one blob folder per mesh, shared by its schedulers (as a shared mount would be)
            "--artifact-dir", os.path.join(self._files.name, "artifacts"), *extra_args])
        self.processes.append(process)
        process.wait_listening()
        if wait_leading:
            admin = Admin(process.address)
            admin.wait_for(lambda: admin.leader().is_leader, f"{process.name} to lead", START_TIMEOUT_S, self)
            admin.close()
        return process

    def agent(self, name: str, schedulers: str, fake_gpus: str = "2x80GiB", policy: str | None = None,
              extra_args: tuple[str, ...] = ()) -> Process:
        """A node agent; ``policy`` is its host policy's YAML (default: the repositories of this checkout)."""
        policy_file = pathlib.Path(self._files.name) / f"policy-{name}-{len(self.processes)}.yaml"
        policy_file.write_text(policy if policy is not None else development_policy_yaml(REPO_ROOT / "examples",
                                                                                           REPO_ROOT / "tests"))
        process = Process(f"agent-{name}", ["-m", "meshserve.node_agent", "--scheduler", schedulers, "--name", name,
                                            "--fake-gpus", fake_gpus, "--host", "127.0.0.1",
                                            "--state-dir", os.path.join(self._files.name, "state", name),
                                            "--policy", str(policy_file), *extra_args])
        self.processes.append(process)
        return process

    def proxy(self, schedulers: str) -> Process:
        process = Process("proxy", ["-m", "meshserve.proxy", "--scheduler", schedulers, "--listen", "127.0.0.1:0"])
        self.processes.append(process)
        process.wait_listening()
        return process

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self._files.cleanup()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{''.join(p.output[-30:])}" for p in self.processes)


class Admin:
    """The admin API of one scheduler, with waits."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.stub = mesh_grpc.AdminServiceStub(self.channel)

    def apply(self, spec_yaml: str) -> list[str]:
        return list(self.stub.Apply(mesh.ApplyRequest(spec_yaml=spec_yaml), timeout=RPC_TIMEOUT_S).applied)

    def replicas(self, deployment: str = "") -> list[mesh.Replica]:
        response = self.stub.Get(mesh.GetRequest(kind="replicas"), timeout=RPC_TIMEOUT_S)
        return [r for r in response.replicas if not deployment or r.deployment == deployment]

    def nodes(self) -> list[mesh.Node]:
        return list(self.stub.Get(mesh.GetRequest(kind="nodes"), timeout=RPC_TIMEOUT_S).nodes)

    def explain(self, kind: str, name: str) -> list[str]:
        return list(self.stub.Explain(mesh.ExplainRequest(kind=kind, name=name), timeout=RPC_TIMEOUT_S).lines)

    def leader(self) -> mesh.LeaderResponse:
        return self.stub.Leader(mesh.LeaderRequest(), timeout=RPC_TIMEOUT_S)

    def wait_for(self, predicate, what: str, timeout: float = CONVERGE_TIMEOUT_S, mesh_: Mesh | None = None):
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                result = predicate()
                if result:
                    return result
            except grpc.RpcError as err:  # a scheduler restarting or a standby taking over
                last_error = err
            time.sleep(0.2)
        detail = f"; last error: {last_error}" if last_error else ""
        logs = f"\n{mesh_.logs()}" if mesh_ else ""
        raise AssertionError(f"timed out waiting for {what}{detail}{logs}")

    def close(self) -> None:
        self.channel.close()


def deployment_yaml(name: str, replicas: int, gpu_memory: str = "10GiB", gpus: int = 1,
                    strategy: str = "spread", model: str = "add_sub", cpu: str = "100m") -> str:
    """A deployment of an example model; every fake host reports this machine's cores, so ask little CPU."""
    return f"""kind: Deployment
name: {name}
model:
  repository: {EXAMPLES}
  name: {model}
replicas: {replicas}
resources:
  gpus: {gpus}
  gpu_memory: {gpu_memory}
  cpu: {cpu}
placement:
  strategy: {strategy}
"""
