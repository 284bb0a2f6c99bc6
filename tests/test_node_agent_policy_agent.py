"""A real `node-agent --policy FILE` process refuses each attack of issue 9 and starts no process for it.

The scheduler is the fake of test_node_agent.py: it hands the agent the
assignments an attacker's specs would become and reads its reports.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys

import pytest
from test_node_agent import (
    AGENT_MODELS,
    READY_TIMEOUT_S,
    REPO_ROOT,
    STEP_TIMEOUT_S,
    FakeScheduler,
    replica_in,
    state_is,
)

from meshserve.node_agent.policy import development_policy_yaml
from meshserve.protos.mesh import control_pb2 as pb

# Every attack's replica reports its refusal within a few reports (100 ms apart).
REFUSED_TIMEOUT_S = 30.0


def _assignment(replica_id: str, repository: str, *, env=None, runtime_args=(), revision: int = 1):
    return pb.ReplicaAssignment(replica_id=replica_id, deployment=replica_id, revision=revision,
                                model_repository=repository, model_name="env_echo",
                                env={"MESHSERVE_GPU_MEMORY_BYTES": "0", **(env or {})},
                                runtime_args=list(runtime_args))


@pytest.fixture
def layout(tmp_path):
    """root/agent (a copy of the test models: allowed), outside/agent (a copy: not), root/evil -> outside."""
    shutil.copytree(AGENT_MODELS, tmp_path / "root" / "agent")
    shutil.copytree(AGENT_MODELS, tmp_path / "outside" / "agent")
    (tmp_path / "root" / "evil").symlink_to(tmp_path / "outside")
    (tmp_path / "policy.yaml").write_text(development_policy_yaml(tmp_path / "root"))
    return tmp_path


def _attacks(layout, marker) -> dict[str, tuple[pb.ReplicaAssignment, str | tuple[str, ...]]]:
    good = str(layout / "root" / "agent")
    shell = f"/bin/sh -c 'id > {marker}' #%s"
    return {
        "browser": (_assignment("browser", good, env={"PYTHONWARNINGS": "all:0:antigravity.x:0:0", "BROWSER": shell}),
                    "env 'BROWSER', 'PYTHONWARNINGS' are not allowed"),
        "preload": (_assignment("preload", good, env={"LD_PRELOAD": str(layout / "evil.so")}),
                    "env 'LD_PRELOAD' is not allowed"),
        "pythonpath": (_assignment("pythonpath", good, env={"PYTHONPATH": str(layout / "outside")}),
                       "env 'PYTHONPATH' is not allowed"),
        "slash": (_assignment("slash", "/"), "model repository '/' (resolved '/') is outside every allowed root"),
        "symlink": (_assignment("symlink", str(layout / "root" / "evil" / "agent")),
                    "is outside every allowed root"),
        "dotdot": (_assignment("dotdot", str(layout / "root" / ".." / "outside" / "agent")),
                   "is outside every allowed root"),
        "lis": (_assignment("lis", good, runtime_args=["--model-repo", str(layout / "outside"), "--lis", "0.0.0.0:0"]),
                ("runtime flag '--model-repo' is not allowed", "runtime flag '--lis' is not allowed")),
        "control": (_assignment("control", good, runtime_args=["--model-control", "explicit"]),
                    "runtime flag --model-control is not allowed"),
    }


async def _agent(scheduler: FakeScheduler, policy: str, name: str):
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshserve.node_agent", "--scheduler", scheduler.address, "--name", name, "--policy", policy,
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _all_failed(ids):
    def check(report: pb.UsageReport) -> bool:
        return all((status := replica_in(report, key)) is not None and status.state == "failed" for key in ids)
    return check


def test_each_attack_is_refused_with_its_reason_and_starts_no_process(layout):
    marker = layout / "pwned"
    attacks = _attacks(layout, marker)

    async def main():
        async with FakeScheduler(report_interval_ms=100) as scheduler:
            process = await _agent(scheduler, str(layout / "policy.yaml"), "policed")
            try:
                connection = await scheduler.next_connection()
                connection.assign(1, *(assignment for assignment, _ in attacks.values()))
                report = await connection.report(_all_failed(attacks), REFUSED_TIMEOUT_S)
                for key, (_, reasons) in attacks.items():
                    status = replica_in(report, key)
                    assert status.message.startswith("refused by host policy: "), (key, status.message)
                    for reason in (reasons,) if isinstance(reasons, str) else reasons:
                        assert reason in status.message, (key, status.message)
                    assert (status.pid, status.address, status.restarts) == (0, "", 0), (key, status)
                # Reports go on; the refusals are not retried (no restart, still no process).
                later = await connection.report(lambda r: r.sequence >= report.sequence + 5, STEP_TIMEOUT_S)
                assert all((s.state, s.pid, s.restarts) == ("failed", 0, 0) for s in later.replicas)
                # The same assignment again: still refused, no second attempt.
                connection.assign(2, *(assignment for assignment, _ in attacks.values()))
                again = await connection.report(lambda r: r.sequence >= later.sequence + 3, STEP_TIMEOUT_S)
                assert all((s.state, s.pid, s.restarts) == ("failed", 0, 0) for s in again.replicas)
            finally:
                process.terminate()
                output = (await asyncio.wait_for(process.communicate(), STEP_TIMEOUT_S))[0].decode()
            assert "started pid" not in output, output
            for key in attacks:
                assert output.count(f"replica {key}: refused by host policy") == 1, output
            assert not marker.exists()

    asyncio.run(main())


def test_a_refused_assignment_runs_once_the_scheduler_changes_it(layout):
    async def main():
        async with FakeScheduler(report_interval_ms=100) as scheduler:
            process = await _agent(scheduler, str(layout / "policy.yaml"), "fixed")
            try:
                connection = await scheduler.next_connection()
                bad = _assignment("r1", str(layout / "root" / "agent"), env={"PYTHONPATH": "/tmp"})
                connection.assign(1, bad)
                await connection.report(state_is("r1", "failed"), REFUSED_TIMEOUT_S)
                connection.assign(2, _assignment("r1", str(layout / "root" / "agent"), revision=2))
                ready = await connection.report(state_is("r1", "ready"), READY_TIMEOUT_S)
                assert replica_in(ready, "r1").pid > 0
            finally:
                process.terminate()
                await asyncio.wait_for(process.communicate(), STEP_TIMEOUT_S)

    asyncio.run(main())


def test_without_a_policy_file_an_agent_runs_nothing(layout):
    async def main():
        async with FakeScheduler(report_interval_ms=100) as scheduler:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "meshserve.node_agent", "--scheduler", scheduler.address, "--name", "bare",
                cwd=REPO_ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            try:
                connection = await scheduler.next_connection()
                connection.assign(1, _assignment("r1", str(layout / "root" / "agent")))
                report = await connection.report(state_is("r1", "failed"), REFUSED_TIMEOUT_S)
                assert "start the node agent with --policy FILE" in replica_in(report, "r1").message
            finally:
                process.terminate()
                await asyncio.wait_for(process.wait(), STEP_TIMEOUT_S)

    asyncio.run(main())


def test_a_wrong_policy_file_stops_the_agent_at_start(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("repository_roots: [/]\n")

    async def main():
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshserve.node_agent", "--scheduler", "127.0.0.1:1", "--policy", str(policy),
            cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output = (await asyncio.wait_for(process.communicate(), STEP_TIMEOUT_S))[0].decode()
        assert process.returncode != 0
        assert "would allow every file of the host" in output and "Traceback" not in output

    asyncio.run(main())
