"""The node agent against a fake scheduler: a real grpc.aio AgentService on 127.0.0.1:0, written here.

The fake scheduler records what agents send and lets a test answer: send
Assignments, break or end the stream, or refuse as a standby naming the
leader. Replicas are real runtime processes serving tests/models/agent.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import sys

import grpc
import numpy as np

from meshserve.clients import AsyncInferenceClient
from meshserve.node_agent.agent import Agent, AgentConfig, leader_named
from meshserve.node_agent.gpu_probe import FakeProbe, NoGpuProbe
from meshserve.node_agent.policy import development_policy_yaml
from meshserve.node_agent.process import pid_alive
from meshserve.node_agent.replica import ReplicaOptions
from meshserve.node_agent.replica_logs import ReplicaLogs
from meshserve.node_agent.supervisor import Supervisor
from meshserve.protos.mesh import control_pb2 as pb
from meshserve.protos.mesh import control_pb2_grpc as pb_grpc

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
AGENT_MODELS = str(REPO_ROOT / "tests" / "models" / "agent")


def _policy_file(tmp_path: pathlib.Path) -> str:
    """The host policy a `node-agent` command of these tests runs with: the test models' repository."""
    path = tmp_path / "policy.yaml"
    path.write_text(development_policy_yaml(AGENT_MODELS))
    return str(path)


GiB = 1 << 30
# Bounds on a broken test, not performance claims.
STEP_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 60.0

_BREAK = object()
_END = object()


class Connection:
    """One agent stream as the fake scheduler sees it."""

    def __init__(self, register: pb.Register):
        self.register = register
        self.inbox: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.reading = asyncio.Event()   # cleared: the scheduler stops reading (the agent's writes back up)
        self.reading.set()

    def assign(self, version: int, *replicas: pb.ReplicaAssignment) -> None:
        self.outbox.put_nowait(pb.SchedulerMessage(assignments=pb.Assignments(version=version, replicas=replicas)))

    def break_stream(self) -> None:
        """Abort the RPC with UNAVAILABLE, as a scheduler crash or a network fault would."""
        self.outbox.put_nowait(_BREAK)

    def end_stream(self) -> None:
        """End the RPC with OK, as a scheduler stepping down would."""
        self.outbox.put_nowait(_END)

    async def report(self, predicate=lambda report: True, timeout: float = STEP_TIMEOUT_S) -> pb.UsageReport:
        """The next UsageReport for which ``predicate`` holds."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.inbox.get()
                if message.HasField("logs"):
                    continue                     # answers to LogsRequests come between reports
                assert message.HasField("report"), f"only the first message may be a Register: {message}"
                if predicate(message.report):
                    return message.report


class FakeScheduler(pb_grpc.AgentServiceServicer):
    def __init__(self, *, report_interval_ms: int = 100, refuse_naming_leader: str | None = None):
        self.report_interval_ms = report_interval_ms
        self.refuse_naming_leader = refuse_naming_leader
        self.connections: asyncio.Queue[Connection] = asyncio.Queue()
        self.refusals = 0
        self.server = grpc.aio.server()
        pb_grpc.add_AgentServiceServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    async def __aenter__(self) -> FakeScheduler:
        await self.server.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.server.stop(0)

    async def next_connection(self, timeout: float = STEP_TIMEOUT_S) -> Connection:
        return await asyncio.wait_for(self.connections.get(), timeout)

    async def Connect(self, request_iterator, context):
        if self.refuse_naming_leader:
            self.refusals += 1
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"standby: not the leader; the leader is {self.refuse_naming_leader}")
        first = await anext(request_iterator)
        assert first.HasField("register"), f"the first message must be a Register: {first}"
        connection = Connection(first.register)

        async def pump():
            while True:
                await connection.reading.wait()
                message = await anext(request_iterator, None)
                if message is None:
                    return
                connection.inbox.put_nowait(message)

        reader = asyncio.create_task(pump())
        self.connections.put_nowait(connection)
        try:
            yield pb.SchedulerMessage(registered=pb.Registered(
                node_name=first.register.node_name, report_interval_ms=self.report_interval_ms,
                heartbeat_timeout_ms=5000, scheduler_id="fake"))
            while True:
                item = await connection.outbox.get()
                if item is _BREAK:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "the test broke the stream")
                if item is _END:
                    return
                yield item
        finally:
            reader.cancel()


def echo_assignment(replica_id: str = "r1", gpu_indices=(1,), memory: str = "10GiB") -> pb.ReplicaAssignment:
    return pb.ReplicaAssignment(replica_id=replica_id, deployment="echo", revision=1,
                                model_repository=AGENT_MODELS, model_name="env_echo",
                                gpu_indices=list(gpu_indices), env={"MESHSERVE_GPU_MEMORY_BYTES": memory})


def replica_in(report: pb.UsageReport, replica_id: str) -> pb.ReplicaStatus | None:
    return next((r for r in report.replicas if r.replica_id == replica_id), None)


def state_is(replica_id: str, state: str):
    def check(report: pb.UsageReport) -> bool:
        replica = replica_in(report, replica_id)
        return replica is not None and replica.state == state
    return check


async def visible_devices(address: str) -> bytes:
    async with AsyncInferenceClient(address, timeout=10) as client:
        result = await client.infer("env_echo", {"NAME": np.array([b"CUDA_VISIBLE_DEVICES"], dtype=object)})
    return result["VALUE"][0]


def closed_port_address() -> str:
    """A loopback address nobody listens on: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_agent_registers_reports_runs_assignments_and_readopts_after_a_broken_stream():
    async def main():
        async with FakeScheduler(report_interval_ms=100) as scheduler:
            supervisor = Supervisor(ReplicaOptions(stop_grace_s=20, startup_timeout_s=READY_TIMEOUT_S))
            agent = Agent(AgentConfig(node_name="node-1", schedulers=[scheduler.address], labels={"zone": "a"},
                                      report_interval_s=30),  # the scheduler's 100 ms wins
                          FakeProbe("2x80GiB", seed="node-1"), supervisor)
            running = asyncio.create_task(agent.run())
            try:
                await scenario(scheduler, agent, supervisor)
            finally:
                agent.stop()
                await running
                await supervisor.drain_all()

    async def scenario(scheduler: FakeScheduler, agent: Agent, supervisor: Supervisor):
        first = await scheduler.next_connection()
        register = first.register
        assert register.node_name == "node-1" and dict(register.labels) == {"zone": "a"}
        assert register.gpu_source == "fake" and register.host == "127.0.0.1" and register.agent_version
        assert [g.memory_total_bytes for g in register.gpus] == [80 * GiB, 80 * GiB]
        assert all(g.uuid.startswith("GPU-fake-") and g.memory_used_bytes == 0 for g in register.gpus)
        assert register.resources.cpu_cores >= 1
        assert 0 < register.resources.memory_available_bytes <= register.resources.memory_total_bytes
        assert list(register.replicas) == []

        report = await first.report(timeout=5)  # well before the agent's own 30 s interval
        assert report.gpu_source == "fake" and report.sequence == 1 and len(report.gpus) == 2

        first.assign(1, echo_assignment())
        ready = await first.report(state_is("r1", "ready"), READY_TIMEOUT_S)
        replica = replica_in(ready, "r1")
        assert replica.deployment == "echo" and replica.revision == 1 and list(replica.gpu_indices) == [1]
        assert replica.address.startswith("127.0.0.1:") and replica.pid > 0 and replica.restarts == 0
        # The fake GPU 1 now holds what the replica declared; GPU 0 is untouched.
        assert ready.gpus[1].memory_used_bytes == 10 * GiB and ready.gpus[1].memory_free_bytes == 70 * GiB
        assert [p.pid for p in ready.gpus[1].processes] == [replica.pid]
        assert ready.gpus[0].memory_used_bytes == 0
        assert await visible_devices(replica.address) == b"1"

        first.break_stream()
        second = await scheduler.next_connection()
        adopted = {r.replica_id: r for r in second.register.replicas}
        assert list(adopted) == ["r1"]
        assert adopted["r1"].state == "ready" and adopted["r1"].pid == replica.pid
        assert adopted["r1"].address == replica.address
        assert second.register.gpus[1].memory_used_bytes == 10 * GiB
        await agent.wait_connected(STEP_TIMEOUT_S, sessions=2)

        second.assign(7, echo_assignment())  # the same set again: converge, never duplicate
        report = await second.report()
        assert report.sequence > ready.sequence  # sequence survives reconnects
        report = await second.report()
        assert replica_in(report, "r1").pid == replica.pid and pid_alive(replica.pid)
        assert agent.assignments_version == 7

        second.assign(8)  # nothing for this node any more
        stopped = await second.report(state_is("r1", "stopped"), STEP_TIMEOUT_S)
        assert replica_in(stopped, "r1").exit_code == 0 and not pid_alive(replica.pid)
        after = await second.report()
        assert replica_in(after, "r1") is None  # a stop is reported, then forgotten
        assert after.gpus[1].memory_used_bytes == 0

    asyncio.run(main())


def test_agent_tries_each_scheduler_and_follows_a_standby_to_the_leader():
    async def main():
        async with FakeScheduler() as leader, FakeScheduler(refuse_naming_leader=leader.address) as standby:
            supervisor = Supervisor()
            agent = Agent(AgentConfig(node_name="cpu-node", schedulers=[closed_port_address(), standby.address],
                                      report_interval_s=0.1),
                          NoGpuProbe("NVML is not available: test"), supervisor)
            running = asyncio.create_task(agent.run())
            try:
                first = await leader.next_connection()
                # Once, unless the refusal raced the Register write and lost its message (then again).
                refusals = standby.refusals
                assert refusals >= 1
                # A CPU-only node says so in its Register and in every report.
                assert first.register.gpu_source == "none" and list(first.register.gpus) == []
                report = await first.report()
                assert report.gpu_source == "none" and list(report.gpus) == []

                first.end_stream()  # the leader steps down cleanly: reconnect, to it first
                second = await leader.next_connection()
                assert second.register.node_name == "cpu-node"
                assert standby.refusals == refusals  # straight back to the leader
            finally:
                agent.stop()
                await running
                await supervisor.drain_all()

    asyncio.run(main())


def test_node_agent_command_drains_its_replicas_on_sigterm_and_exits_0(tmp_path):
    policy = _policy_file(tmp_path)

    async def main():
        async with FakeScheduler(report_interval_ms=100) as scheduler:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "meshserve.node_agent", "--scheduler", scheduler.address, "--name", "cli-node",
                "--fake-gpus", "1x16GiB", "--labels", "rack=r1,zone=b", "--stop-grace", "20", "--policy", policy,
                cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            try:
                connection = await scheduler.next_connection()
                assert connection.register.node_name == "cli-node"
                assert dict(connection.register.labels) == {"rack": "r1", "zone": "b"}
                assert connection.register.gpu_source == "fake" and len(connection.register.gpus) == 1
                connection.assign(1, echo_assignment(gpu_indices=[0], memory="4GiB"))
                ready = await connection.report(state_is("r1", "ready"), READY_TIMEOUT_S)
                pid = replica_in(ready, "r1").pid
                assert ready.gpus[0].memory_used_bytes == 4 * GiB

                process.send_signal(signal.SIGTERM)
                final = await connection.report(state_is("r1", "stopped"), STEP_TIMEOUT_S)
                assert replica_in(final, "r1").exit_code == 0
                assert await asyncio.wait_for(process.wait(), STEP_TIMEOUT_S) == 0
                assert not pid_alive(pid)
                output = (await process.stdout.read()).decode()
                assert "FAKE GPUs" in output and "draining replicas" in output
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()

    asyncio.run(main())


def test_leader_named_by_a_refusal():
    refused = grpc.StatusCode.FAILED_PRECONDITION
    assert leader_named(refused, "not the leader; the leader is 10.0.0.2:7000") == "10.0.0.2:7000"
    # scheduler/core.py's own wording, with a scheduler id that holds digits:
    assert leader_named(refused, "scheduler sched-1 is not the leader; the leader is sched-2 at 127.0.0.1:7001") \
        == "127.0.0.1:7001"
    assert leader_named(grpc.StatusCode.UNAVAILABLE, "standby (leader: sched-b.local:7000)") == "sched-b.local:7000"
    assert leader_named(refused, "leader at [::1]:7000") == "[::1]:7000"
    assert leader_named(refused, "whatever", (("leader-address", "10.0.0.3:7000"),)) == "10.0.0.3:7000"
    assert leader_named(refused, "no leader elected yet") is None
    assert leader_named(grpc.StatusCode.PERMISSION_DENIED, "the leader is 10.0.0.2:7000") is None


def test_replicas_do_not_outlive_a_killed_agent(tmp_path):
    policy = _policy_file(tmp_path)

    async def main():
        async with FakeScheduler(report_interval_ms=100) as scheduler:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "meshserve.node_agent", "--scheduler", scheduler.address, "--name", "doomed",
                "--policy", policy,
                cwd=REPO_ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                connection = await scheduler.next_connection()
                assert connection.register.gpu_source == "none"  # no --fake-gpus on a GPU-less machine
                connection.assign(1, echo_assignment(gpu_indices=[]))
                ready = await connection.report(state_is("r1", "ready"), READY_TIMEOUT_S)
                pid = replica_in(ready, "r1").pid
            finally:
                process.kill()
                await process.wait()
            # The kernel tells the orphan (PR_SET_PDEATHSIG): it drains and exits by itself.
            async with asyncio.timeout(STEP_TIMEOUT_S):
                while pid_alive(pid):  # noqa: ASYNC110 -- no event for a process that is not our child
                    await asyncio.sleep(0.05)

    asyncio.run(main())


def test_a_failing_gpu_probe_reads_as_no_gpus_and_never_stops_the_agent():
    class BrokenNvml:
        source = "nvml"
        failing = True

        async def sample(self, loads=()):
            if self.failing:
                raise RuntimeError("GPU has fallen off the bus")
            return await FakeProbe("1x8GiB").sample(loads)

        def close(self):
            pass

    async def main():
        probe = BrokenNvml()
        async with FakeScheduler() as scheduler:
            supervisor = Supervisor()
            agent = Agent(AgentConfig(node_name="n", schedulers=[scheduler.address]), probe, supervisor)
            running = asyncio.create_task(agent.run())
            try:
                connection = await scheduler.next_connection()
                assert connection.register.gpu_source == "nvml" and list(connection.register.gpus) == []
                await connection.report()
                probe.failing = False
                await connection.report(lambda report: len(report.gpus) == 1)
            finally:
                agent.stop()
                await running

    asyncio.run(main())


def test_a_log_answer_cancelled_mid_write_leaves_the_agents_stream_up(tmp_path):
    """A cancel for a log request whose chunk is being written stops that answer, not the stream.

    grpc.aio cancels a whole call when a write on it is cancelled: the scheduler
    here stops reading so a big tail's write is pending when the cancel comes.
    """
    logs = ReplicaLogs(tmp_path / "logs")
    logs.directory.mkdir()
    line = "x" * 1000 + "\n"
    logs.path("chatty").write_text(line * 8000)          # 8 MB of output: far more than a stream's window

    async def main():
        async with FakeScheduler(report_interval_ms=100) as scheduler:
            supervisor = Supervisor(ReplicaOptions(logs=logs))
            agent = Agent(AgentConfig(node_name="n", schedulers=[scheduler.address]), NoGpuProbe(), supervisor)
            running = asyncio.create_task(agent.run())
            try:
                connection = await scheduler.next_connection()
                await connection.report()
                connection.reading.clear()
                connection.outbox.put_nowait(pb.SchedulerMessage(logs=pb.LogsRequest(
                    request_id=1, replica_id="chatty", tail_lines=8000, max_bytes=16 << 20)))
                for _ in range(int(STEP_TIMEOUT_S / 0.05)):  # the tail outgrows the window: a write stays pending
                    if agent._write_lock.locked():
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
                assert agent._write_lock.locked(), "the agent should be blocked writing a chunk"
                connection.outbox.put_nowait(pb.SchedulerMessage(logs=pb.LogsRequest(request_id=1, cancel=True)))
                await asyncio.sleep(0.5)
                connection.reading.set()
                for _ in range(3):                       # reports go on, on the same stream
                    await connection.report()
                assert not running.done(), running
                assert agent.sessions == 1 and scheduler.connections.empty()
            finally:
                agent.stop()
                await running

    asyncio.run(main())


def test_a_stream_cancelled_inside_the_agent_is_reconnected_not_fatal():
    """However the agent's own call ends cancelled, the agent reconnects; it never exits on it."""
    async def main():
        async with FakeScheduler(report_interval_ms=100) as scheduler:
            supervisor = Supervisor()
            agent = Agent(AgentConfig(node_name="n", schedulers=[scheduler.address]), NoGpuProbe(), supervisor)
            running = asyncio.create_task(agent.run())
            try:
                first = await scheduler.next_connection()
                await first.report()
                agent._call.cancel()                     # a read on it now raises CancelledError
                second = await scheduler.next_connection()
                await second.report()
                assert not running.done(), running
                await agent.wait_connected(STEP_TIMEOUT_S, sessions=2)
            finally:
                agent.stop()
                await running

    asyncio.run(main())
