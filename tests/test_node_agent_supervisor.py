"""The node agent's supervisor: unit tests with a fake launcher and clock, then real runtime replicas.

The real replicas serve tests/models/agent: ``env_echo`` answers with the
environment its process saw, so the tests prove what the agent set, and
``crasher`` exits with a given code on request.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.clients import AsyncInferenceClient
from meshserve.common.backoff import Backoff
from meshserve.common.errors import MeshError
from meshserve.node_agent.policy import HostPolicy
from meshserve.node_agent.process import pid_alive
from meshserve.node_agent.replica import ReplicaOptions, ReplicaSpec
from meshserve.node_agent.supervisor import Supervisor

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
AGENT_MODELS = str(REPO_ROOT / "tests" / "models" / "agent")
# Bounds a broken test, not a performance claim: a replica starts in ~2 s on a loaded 2-core machine.
READY_TIMEOUT_S = 60.0


# ---------------------------------------------------------------- fakes


class FakeClock:
    """Time moves only when someone sleeps; every sleep is recorded."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class FakeProcess:
    """``behaviour``: "crash" (says boom on stderr, exits 3), "serve" (listens until signalled),
    "stubborn" (listens and ignores SIGTERM)."""

    def __init__(self, pid: int, behaviour: str, launcher: FakeLauncher, host: str):
        self.pid = pid
        self.host = host
        self.behaviour = behaviour
        self.signals: list[int] = []
        self._launcher = launcher
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        launcher.live += 1
        launcher.max_live = max(launcher.max_live, launcher.live)
        if behaviour == "crash":
            self._finish(3)

    def _finish(self, code: int) -> None:
        if not self._exit.done():
            self._launcher.live -= 1
            self._exit.set_result(code)

    async def lines(self):
        if self.behaviour == "crash":
            yield "stderr", "Traceback: something"
            yield "stderr", "RuntimeError: boom"
            return
        yield "stdout", f"meshserve runtime listening on {self.host}:{40000 + self.pid}"
        await asyncio.shield(self._exit)

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)
        if signum == signal.SIGKILL:
            self._finish(-9)
        elif signum == signal.SIGTERM and self.behaviour != "stubborn":
            self._finish(0)

    def crash(self, code: int) -> None:
        self._finish(code)


class FakeLauncher:
    def __init__(self, *behaviours: str):
        self.behaviours = list(behaviours)
        self.processes: list[FakeProcess] = []
        self.commands: list[tuple[list[str], dict[str, str]]] = []
        self.live = 0
        self.max_live = 0

    async def launch(self, argv, env, cwd=None):
        behaviour = self.behaviours.pop(0) if len(self.behaviours) > 1 else self.behaviours[0]
        self.commands.append((list(argv), dict(env)))
        host = argv[argv.index("--listen") + 1].rsplit(":", 1)[0]
        process = FakeProcess(100 + len(self.processes), behaviour, self, host)
        self.processes.append(process)
        return process


async def instantly_ready(address: str) -> None:
    return None


def state_of(replica_id: str, **expected):
    def check(statuses):
        for status in statuses:
            if status.replica_id == replica_id:
                return all(getattr(status, key) == value for key, value in expected.items())
        return False
    return check


def fake_supervisor(launcher, clock=None, **options) -> Supervisor:
    options.setdefault("base_env", {"PATH": "/usr/bin"})
    return Supervisor(ReplicaOptions(**options), launcher=launcher, clock=clock or FakeClock(),
                      wait_ready=instantly_ready)


# ---------------------------------------------------------------- unit


def test_backoff_is_exponential_and_capped():
    backoff = Backoff(initial_s=0.5, max_s=4.0)
    assert [backoff.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.delay(0) == 0.0
    assert backoff.delay(10_000) == 4.0


def test_command_line_and_environment():
    async def main():
        launcher = FakeLauncher("serve")
        supervisor = fake_supervisor(launcher, listen_host="10.1.2.3", python="/opt/py")
        spec = ReplicaSpec.create("r1", model_repository="/models", model_name="m", gpu_indices=[2, 0],
                                  env={"CUDA_VISIBLE_DEVICES": "7", "A": "b"}, runtime_args=["--grace-period", "5"])
        supervisor.apply([spec])
        await supervisor.wait_for(state_of("r1", state="ready"), 5)
        argv, env = launcher.commands[0]
        assert argv == ["/opt/py", "-m", "meshserve.runtime", "--model-repository", "/models", "--model", "m",
                        "--listen", "10.1.2.3:0", "--strict", "--drain-delay", "2", "--shared-memory", "none",
                        "--grace-period", "5"]
        assert env["CUDA_VISIBLE_DEVICES"] == "2,0"  # gpu_indices win over the assignment's env
        assert env["A"] == "b" and env["PATH"] == "/usr/bin" and env["PYTHONUNBUFFERED"] == "1"
        assert supervisor.status("r1").address == "10.1.2.3:40100"
        await supervisor.drain_all()

    asyncio.run(main())


def test_crash_loop_backs_off_exponentially_and_reports_the_exit():
    async def main():
        clock = FakeClock()
        supervisor = fake_supervisor(FakeLauncher("crash"), clock, backoff=Backoff(initial_s=1.0, max_s=4.0))
        supervisor.apply([ReplicaSpec.create("r1", model_name="m")])
        statuses = await supervisor.wait_for(state_of("r1", restarts=5), 5)
        status = statuses[0]
        assert clock.sleeps[:5] == [1.0, 2.0, 4.0, 4.0, 4.0]
        assert status.exit_code == 3
        assert "exited with code 3" in status.message and "RuntimeError: boom" in status.message
        await supervisor.drain_all()
        assert supervisor.status("r1").state == "stopped"

    asyncio.run(main())


def test_backoff_resets_after_a_long_ready_run():
    async def main():
        clock = FakeClock()
        launcher = FakeLauncher("serve")
        supervisor = fake_supervisor(launcher, clock, backoff=Backoff(initial_s=1.0, max_s=8.0), backoff_reset_s=60)
        supervisor.apply([ReplicaSpec.create("r1")])
        for round_ in range(3):  # quick crashes: 1, 2, 4
            await supervisor.wait_for(state_of("r1", state="ready", restarts=round_), 5)
            launcher.processes[-1].crash(1)
        await supervisor.wait_for(state_of("r1", state="ready", restarts=3), 5)
        clock.now += 61  # ready for over a minute
        launcher.processes[-1].crash(1)
        await supervisor.wait_for(state_of("r1", state="ready", restarts=4), 5)
        assert clock.sleeps == [1.0, 2.0, 4.0, 1.0]
        await supervisor.drain_all()

    asyncio.run(main())


def test_changed_spec_replaces_the_process_after_the_old_one_exits():
    async def main():
        launcher = FakeLauncher("serve")
        supervisor = fake_supervisor(launcher)
        supervisor.apply([ReplicaSpec.create("r1", revision=1)])
        await supervisor.wait_for(state_of("r1", state="ready"), 5)
        supervisor.apply([ReplicaSpec.create("r1", revision=1)])  # the same: nothing happens
        assert len(launcher.processes) == 1
        supervisor.apply([ReplicaSpec.create("r1", revision=2)])
        await supervisor.wait_for(state_of("r1", state="ready", revision=2), 5)
        assert len(launcher.processes) == 2 and launcher.max_live == 1
        assert launcher.processes[0].signals == [signal.SIGTERM]
        await supervisor.drain_all()

    asyncio.run(main())


def test_a_replica_that_ignores_sigterm_is_killed_after_the_grace_period():
    async def main():
        launcher = FakeLauncher("stubborn")
        supervisor = fake_supervisor(launcher, stop_grace_s=0.05)
        supervisor.apply([ReplicaSpec.create("r1")])
        await supervisor.wait_for(state_of("r1", state="ready"), 5)
        supervisor.apply([])
        await supervisor.wait_for(state_of("r1", state="stopped"), 5)
        assert launcher.processes[0].signals == [signal.SIGTERM, signal.SIGKILL]
        assert supervisor.status("r1").exit_code == -9
        supervisor.forget_stopped()
        assert supervisor.statuses() == []
        await supervisor.drain_all()

    asyncio.run(main())


def test_not_ready_in_time_is_a_failure():
    async def never_ready(address: str) -> None:
        await asyncio.Event().wait()

    async def main():
        launcher = FakeLauncher("serve")
        supervisor = Supervisor(ReplicaOptions(base_env={}, startup_timeout_s=0.05), launcher=launcher,
                                clock=FakeClock(), wait_ready=never_ready)
        supervisor.apply([ReplicaSpec.create("r1")])
        status = (await supervisor.wait_for(state_of("r1", restarts=1), 5))[0]
        assert "not ready" in status.message and "0.05" in status.message
        assert launcher.processes[0].signals == [signal.SIGKILL]
        await supervisor.drain_all()

    asyncio.run(main())


# ---------------------------------------------------------------- real replicas


def real_supervisor(**options) -> Supervisor:
    options.setdefault("stop_grace_s", 20.0)
    options.setdefault("startup_timeout_s", READY_TIMEOUT_S)
    return Supervisor(ReplicaOptions(**options))


async def env_of(address: str, *names: str) -> list[bytes]:
    async with AsyncInferenceClient(address, timeout=10) as client:
        result = await client.infer("env_echo", {"NAME": np.array([n.encode() for n in names], dtype=object)})
    return list(result["VALUE"])


def test_real_replicas_see_their_gpus_and_env_then_drain_when_unassigned():
    async def main():
        supervisor = real_supervisor()
        gpu = ReplicaSpec.create("gpu", model_repository=AGENT_MODELS, model_name="env_echo", gpu_indices=[1, 3],
                                 env={"MESHSERVE_TEST": "hello", "CUDA_VISIBLE_DEVICES": "9"})
        cpu = ReplicaSpec.create("cpu", model_repository=AGENT_MODELS, model_name="env_echo")
        try:
            supervisor.apply([gpu, cpu])
            statuses = await supervisor.wait_for(lambda s: all(r.state == "ready" for r in s), READY_TIMEOUT_S)
            by_id = {status.replica_id: status for status in statuses}
            assert await env_of(by_id["gpu"].address, "CUDA_VISIBLE_DEVICES", "MESHSERVE_TEST") == [b"1,3", b"hello"]
            assert await env_of(by_id["cpu"].address, "CUDA_VISIBLE_DEVICES", "MESHSERVE_TEST") == [b"", b"<unset>"]
            assert by_id["gpu"].address.startswith("127.0.0.1:") and by_id["gpu"].gpu_indices == (1, 3)
            loads = supervisor.gpu_loads()
            assert [(load.pid, load.gpu_indices) for load in loads] == [(by_id["gpu"].pid, (1, 3))]

            supervisor.apply([cpu])  # "gpu" is no longer assigned
            await supervisor.wait_for(state_of("gpu", state="stopped"), 30)
            gone = supervisor.status("gpu")
            assert gone.exit_code == 0 and gone.pid == 0 and "stopped on request" in gone.message
            assert not pid_alive(by_id["gpu"].pid)
            assert supervisor.status("cpu").pid == by_id["cpu"].pid  # untouched
            assert supervisor.gpu_loads() == []
        finally:
            await supervisor.drain_all()
        assert [s.state for s in supervisor.statuses()] == ["stopped", "stopped"]
        assert not pid_alive(by_id["cpu"].pid)

    asyncio.run(main())


def test_real_replica_crash_is_restarted_with_exit_code_and_output_reported():
    async def main():
        supervisor = real_supervisor(backoff=Backoff(initial_s=0.2, max_s=1.0))
        spec = ReplicaSpec.create("crashy", model_repository=AGENT_MODELS, model_name="crasher")
        try:
            supervisor.apply([spec])
            first = (await supervisor.wait_for(state_of("crashy", state="ready"), READY_TIMEOUT_S))[0]
            async with AsyncInferenceClient(first.address, timeout=10, retries=0) as client:
                with pytest.raises(MeshError):  # the process dies mid-call: Unavailable or Internal
                    await client.infer("crasher", {"CODE": np.array([3], dtype=np.int32)})
            crashed = (await supervisor.wait_for(state_of("crashy", exit_code=3), 30))[0]
            assert "exited with code 3" in crashed.message
            assert "crasher: exiting with code 3 on request" in crashed.message  # the stderr tail
            second = (await supervisor.wait_for(state_of("crashy", state="ready", restarts=1), READY_TIMEOUT_S))[0]
            assert second.pid != first.pid and second.exit_code == 3

            os.kill(second.pid, signal.SIGKILL)
            killed = (await supervisor.wait_for(state_of("crashy", exit_code=-9), 30))[0]
            assert "SIGKILL" in killed.message
            third = (await supervisor.wait_for(state_of("crashy", state="ready", restarts=2), READY_TIMEOUT_S))[0]
            assert third.pid not in (first.pid, second.pid)
        finally:
            await supervisor.drain_all()
        assert supervisor.status("crashy").state == "stopped"

    asyncio.run(main())


def test_a_stopped_real_replica_still_answers_calls_sent_after_it_said_not_serving():
    """What a proxy relies on when a replica is removed: the agent stops it (SIGTERM), the replica
    says NOT_SERVING at once, and a call sent after that (by a proxy that has not routed away
    yet) is still answered, for the drain delay; then it stops on its own."""
    async def main():
        supervisor = real_supervisor()
        spec = ReplicaSpec.create("leaving", model_repository=AGENT_MODELS, model_name="env_echo")
        try:
            supervisor.apply([spec])
            [ready] = await supervisor.wait_for(lambda s: s[0].state == "ready", READY_TIMEOUT_S)
            async with grpc.aio.insecure_channel(ready.address) as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
                supervisor.apply([])                                # no longer assigned: SIGTERM
                async with asyncio.timeout(READY_TIMEOUT_S):
                    while (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING:
                        pass
                watch.cancel()
                async with AsyncInferenceClient(ready.address, timeout=10, retries=0) as client:
                    answer = await client.infer("env_echo", {"NAME": np.array([b"MESHSERVE_TEST"], dtype=object)})
            assert list(answer["VALUE"]) == [b"<unset>"]
            stopped = (await supervisor.wait_for(state_of("leaving", state="stopped"), 30))[0]
            assert stopped.exit_code == 0
        finally:
            await supervisor.drain_all()

    asyncio.run(main())


def test_replicas_get_shared_memory_only_where_the_host_policy_allows_it(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)

    async def main(shared_memory: str | None) -> str:
        keys = {"repository_roots": [str(tmp_path)], "allow_root": True}
        if shared_memory:
            keys["shared_memory"] = shared_memory
        launcher = FakeLauncher("serve")
        supervisor = fake_supervisor(launcher, policy=HostPolicy.from_mapping(keys))
        supervisor.apply([ReplicaSpec.create("r1", model_repository=str(tmp_path / "models"), model_name="m")])
        await supervisor.wait_for(state_of("r1", state="ready"), 5)
        argv, _ = launcher.commands[0]
        await supervisor.drain_all()
        return argv[argv.index("--shared-memory") + 1]

    assert asyncio.run(main(None)) == "none"
    assert asyncio.run(main("system")) == "system"
