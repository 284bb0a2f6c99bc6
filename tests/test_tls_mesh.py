"""A small mesh over mutual TLS, every hop a real handshake: real processes on loopback.

scheduler serve, a node agent, the replica it starts and a proxy, each with
its own certificate from one cluster CA and ``--tls-require-client-cert``:
the agent registers (agent -> scheduler), its replica becomes ready (the
agent hands its TLS settings to the runtime and health-checks it over
mTLS), the proxy follows routes (proxy -> scheduler) and forwards
(proxy -> runtime), ctl reads the mesh (ctl -> scheduler), and a client
calls through the proxy. A caller without a client certificate is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from mesh_harness import CONVERGE_TIMEOUT_S, REPO_ROOT, RPC_TIMEOUT_S, Process, deployment_yaml
from tls_pki import Pki

from meshserve.clients import InferenceClient, Unavailable
from meshserve.common.security.tls import TlsConfig, as_flags, sync_channel
from meshserve.node_agent.policy import development_policy_yaml
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc

POLL_S = 0.2   # polling other processes' state: there is no event to await across processes


def _wait(predicate, what: str, processes: list[Process], timeout: float = CONVERGE_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except (grpc.RpcError, Unavailable) as err:
            last = err
        time.sleep(POLL_S)
    logs = "\n".join(f"--- {p.name}\n{''.join(p.output[-30:])}" for p in processes)
    raise AssertionError(f"timed out waiting for {what}; last error: {last}\n{logs}")


@pytest.fixture
def processes():
    started: list[Process] = []
    yield started
    for process in reversed(started):
        process.stop()


def test_a_mesh_over_mutual_tls_end_to_end(tmp_path, processes):
    pki = Pki(tmp_path / "ca")

    def flags(name: str, role: str) -> list[str]:
        return as_flags(pki.tls(name, role, require_client_cert=True))

    scheduler = Process("scheduler", ["-m", "meshserve.scheduler", "serve", "--listen", "127.0.0.1:0", "--store",
                                      f"sqlite:///{tmp_path / 'state.db'}", "--id", "s1", "--report-interval",
                                      "0.3", *flags("scheduler-1", "scheduler")])
    processes.append(scheduler)
    address = scheduler.wait_listening()
    policy = tmp_path / "policy.yaml"     # the host policy lets replicas run from this checkout's examples
    policy.write_text(development_policy_yaml(REPO_ROOT / "examples", REPO_ROOT / "tests"))
    processes.append(Process("agent", ["-m", "meshserve.node_agent", "--scheduler", address, "--name", "node-a",
                                       "--fake-gpus", "1x24GiB", "--host", "127.0.0.1", "--policy", str(policy),
                                       "--state-dir", str(tmp_path / "agent-state"), *flags("node-a", "agent")]))
    admin_tls = pki.tls("admin-1", "admin")
    channel = sync_channel(address, admin_tls)
    admin = mesh_grpc.AdminServiceStub(channel)
    try:
        _wait(lambda: [n.name for n in admin.Get(mesh.GetRequest(kind="nodes"), timeout=RPC_TIMEOUT_S).nodes]
              == ["node-a"], "node-a to register over mTLS", processes)

        # Without a client certificate nobody gets past the handshake: not an agent, not an admin.
        with sync_channel(address, TlsConfig(ca=pki.ca)) as anonymous:
            with pytest.raises(grpc.RpcError) as refused:
                mesh_grpc.AdminServiceStub(anonymous).Get(mesh.GetRequest(kind="nodes"), timeout=RPC_TIMEOUT_S)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        admin.Apply(mesh.ApplyRequest(spec_yaml=deployment_yaml("adder", replicas=1)), timeout=RPC_TIMEOUT_S)
        replica = _wait(lambda: [r for r in admin.Get(mesh.GetRequest(kind="replicas"), timeout=RPC_TIMEOUT_S)
                                 .replicas if r.state == "ready"], "the replica to be ready over mTLS",
                        processes)[0]

        proxy = Process("proxy", ["-m", "meshserve.proxy", "--scheduler", address, "--listen", "127.0.0.1:0",
                                  "--event-loop", "asyncio", *flags("proxy-1", "proxy")])
        processes.append(proxy)
        proxy_address = proxy.wait_listening()
        a = np.arange(16, dtype=np.float32)[None, :]
        with InferenceClient(proxy_address, tls=pki.tls("client-1"), timeout=RPC_TIMEOUT_S, retries=0) as client:
            _wait(lambda: client.is_model_ready("add_sub"), "the proxy to route add_sub", processes)
            assert client.infer("add_sub", {"INPUT0": a, "INPUT1": a})["OUTPUT0"][0, 1] == 2.0
        with InferenceClient(replica.address, tls=TlsConfig(ca=pki.ca), timeout=RPC_TIMEOUT_S,
                             retries=0) as anonymous, pytest.raises(Unavailable):
            anonymous.infer("add_sub", {"INPUT0": a, "INPUT1": a})   # the replica itself requires a certificate

        ctl = subprocess.run([sys.executable, "-m", "meshserve.scheduler", "ctl", "--server", address, *as_flags(admin_tls),
                              "-o", "json", "get", "replicas"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=60)
        assert ctl.returncode == 0, ctl.stderr
        assert [r["state"] for r in json.loads(ctl.stdout)["replicas"]] == ["ready"]
    finally:
        channel.close()
