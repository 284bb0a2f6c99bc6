"""Per-replica isolation (node_agent/isolation.py): commands, exit classification, and real replicas
that outgrow their memory, under RLIMIT_DATA here and under a systemd scope where one can be made.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import resource
import subprocess
import sys

import pytest
from mesh_harness import deployment_yaml
from scheduler_brain import brain, run

from meshserve.common.assignment_env import CPU_ENV, MEMORY_ENV
from meshserve.common.backoff import Backoff
from meshserve.node_agent.isolation import (
    IsolationUnavailable,
    NoIsolation,
    ReplicaLimits,
    RlimitIsolation,
    SystemdIsolation,
    choose_isolation,
    oom_kills,
    shown_size,
    systemd_problem,
    unit_name,
)
from meshserve.node_agent.replica import ReplicaOptions, ReplicaSpec
from meshserve.node_agent.supervisor import Supervisor

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
AGENT_MODELS = str(REPO_ROOT / "tests" / "models" / "agent")
# Bounds a broken test, not a performance claim.
READY_TIMEOUT_S = 60.0
GiB, MiB = 1 << 30, 1 << 20

# What the kernel writes in a cgroup v2 memory.events file (Documentation/admin-guide/cgroup-v2.rst).
MEMORY_EVENTS_AFTER_OOM = "low 0\nhigh 0\nmax 1372\noom 3\noom_kill 2\noom_group_kill 0\n"
MEMORY_EVENTS_QUIET = "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"


# ---------------------------------------------------------------- limits from the assignment env


def test_the_scheduler_sends_the_booked_memory_and_cpu_with_each_assignment(tmp_path):
    async def main():
        async with brain(tmp_path) as b:
            await b.register("node-a")
            await b.apply(deployment_yaml("lean", replicas=1, cpu="500m")
                          .replace("  cpu: 500m\n", "  cpu: 500m\n  memory: 1GiB\n"))
            await b.apply(deployment_yaml("unbooked", replicas=1))
            envs = {a.deployment: dict(a.env) for a in b.core.assignments_for("node-a").replicas}
        assert envs["lean"][MEMORY_ENV] == str(GiB) and envs["lean"][CPU_ENV] == "0.5"
        assert envs["unbooked"][MEMORY_ENV] == "0"                  # nothing booked: the agent sets no limit
        assert ReplicaLimits.from_env(envs["lean"]) == ReplicaLimits(GiB, 0.5)
        assert ReplicaLimits.from_env(envs["unbooked"]).memory_bytes is None
    run(main())



def test_limits_come_from_the_assignment_env():
    assert ReplicaLimits.from_env({MEMORY_ENV: str(GiB), CPU_ENV: "0.5"}) == ReplicaLimits(GiB, 0.5)
    assert ReplicaLimits.from_env({MEMORY_ENV: "512MiB"}) == ReplicaLimits(512 * MiB, None)
    assert ReplicaLimits.from_env({}) == ReplicaLimits(None, None)
    assert ReplicaLimits.from_env({MEMORY_ENV: "0", CPU_ENV: "0"}) == ReplicaLimits(None, None)  # nothing booked


@pytest.mark.parametrize("memory, cpu", [("lots", "nan"), ("-5", "inf"), ("1G", "-1"), ("", "1e999"),
                                         ("x" * 10_000, "½"), ("9" * 30, "1e300")])
def test_unreadable_limits_are_no_limit_and_do_not_raise(memory, cpu, caplog):
    assert ReplicaLimits.from_env({MEMORY_ENV: memory, CPU_ENV: cpu}, "r1") == ReplicaLimits(None, None)
    assert "no memory limit" in caplog.text and "no CPU limit" in caplog.text
    assert max(len(line) for line in caplog.text.splitlines()) < 400   # a huge value is not echoed whole


def test_sizes_read_as_people_write_them():
    assert shown_size(GiB) == "1 GiB"
    assert shown_size(256 * MiB) == "256 MiB"
    assert shown_size(1_500_000) == "1500000 bytes"


# ---------------------------------------------------------------- systemd command construction


def test_unit_names_escape_every_unsafe_byte_and_stay_valid():
    assert unit_name("web-0") == "meshserve-replica-web\\x2d0.scope"
    assert unit_name("a.b_c9") == "meshserve-replica-a.b_c9.scope"
    hostile = unit_name("../x --uid=0;é")
    assert hostile == "meshserve-replica-..\\x2fx\\x20\\x2d\\x2duid\\x3d0\\x3b\\xc3\\xa9.scope"
    assert all(ch.isalnum() or ch in "\\_.-" for ch in hostile)
    assert unit_name("a/b") != unit_name("a_b") != unit_name("a\\x2fb")
    assert unit_name("\udc80") == "meshserve-replica-\\xed\\xb2\\x80.scope"   # a lone surrogate: escaped, no error
    long_a, long_b = unit_name("x" * 300 + "a"), unit_name("x" * 300 + "b")
    assert len(long_a) <= 255 and len(long_b) <= 255 and long_a != long_b and long_a.endswith(".scope")


def test_systemd_scope_command_carries_memory_max_and_cpu_quota():
    argv = ["python", "-m", "meshserve.runtime", "--model", "m"]
    command = SystemdIsolation().wrap(argv, ReplicaLimits(GiB, 0.5), "web-0")
    assert command[:3] == ["systemd-run", "--scope", "--quiet"]
    assert "--unit=meshserve-replica-web\\x2d0.scope" in command
    assert f"--property=MemoryMax={GiB}" in command and "--property=MemorySwapMax=0" in command
    assert "--property=CPUQuota=50%" in command
    assert "--collect" not in command   # an OOM-killed scope must stay until its Result was read
    assert "--property=DevicePolicy=closed" in command and "--property=DeviceAllow=char-nvidia rw" in command
    assert command[command.index("--") + 1:] == argv
    assert "--property=CPUQuota=200%" in SystemdIsolation().wrap(argv, ReplicaLimits(None, 2), "r")
    assert "--property=CPUQuota=1%" in SystemdIsolation().wrap(argv, ReplicaLimits(None, 0.001), "r")


def test_systemd_scope_without_booked_limits_sets_no_property_and_user_manager_when_asked():
    command = SystemdIsolation(user=True).wrap(["x"], ReplicaLimits(), "r")
    assert command[:2] == ["systemd-run", "--user"]
    assert not [arg for arg in command if arg.startswith(("--property=Memory", "--property=CPU"))]


def test_systemd_switches_user_inside_the_scope_then_sets_the_parent_death_signal_again():
    command = SystemdIsolation(uid=1234, gid=99).wrap(["runtime"], ReplicaLimits(GiB), "r")
    assert not [arg for arg in command if arg.startswith(("--uid", "--gid"))]   # those keep root's groups
    inner = command[command.index("--") + 1:]
    assert inner[0] == sys.executable and "os.setgroups([])" in inner[2] and inner[3:5] == ["1234", "99"]
    assert inner[5] == sys.executable and "prctl" in inner[7] and inner[8] == str(os.getpid())
    assert inner[-1] == "runtime"
    assert SystemdIsolation(uid=1234).switches_user and not SystemdIsolation().switches_user


def test_the_user_switch_wrapper_drops_every_group_for_real():
    if os.geteuid() != 0:
        pytest.skip("switching user needs root")
    nobody = 65534
    command = SystemdIsolation(uid=nobody, gid=nobody).wrap(["runtime"], ReplicaLimits(), "r")
    as_user = command[command.index("--") + 1:][:5]     # the switch, then (here) a command nobody may run
    out = subprocess.run([*as_user, "/bin/sh", "-c", "echo $(id -u) $(id -g) groups: $(id -G)"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == [str(nobody), str(nobody), "groups:", str(nobody)]   # id -G: the gid, nothing more


def test_systemd_keeps_dollar_signs_literal_where_systemd_run_would_expand_them():
    command = SystemdIsolation(expand_flag=True).wrap(["runtime", "--x=$HOME"], ReplicaLimits(), "r")
    assert "--expand-environment=no" in command[:command.index("--")] and command[-1] == "--x=$HOME"
    assert "--expand-environment=no" not in SystemdIsolation().wrap(["runtime"], ReplicaLimits(), "r")


# ---------------------------------------------------------------- OOM detection


def test_oom_kills_are_read_from_the_memory_events_format():
    assert oom_kills(MEMORY_EVENTS_AFTER_OOM) == 2
    assert oom_kills(MEMORY_EVENTS_QUIET) == 0
    assert oom_kills("") == 0
    assert oom_kills("oom_kill lots\n") == 0
    assert oom_kills("oom_kill_x 5\noom 1\n") == 0


def _fake_systemctl(tmp_path: pathlib.Path, show: str) -> tuple[str, pathlib.Path]:
    """A stand-in systemctl (this host has no systemd manager): prints ``show`` and logs its arguments."""
    calls = tmp_path / "calls"
    script = tmp_path / "systemctl"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n"
                      f"if [ \"$1\" = show ]; then printf '%s' '{show}'; fi\n")
    script.chmod(0o755)
    return str(script), calls


def test_systemd_exit_reason_from_the_scope_result_frees_the_unit_name(tmp_path):
    systemctl, calls = _fake_systemctl(tmp_path, "Result=oom-kill\nControlGroup=\n")
    isolation = SystemdIsolation(systemctl=systemctl)
    reason = asyncio.run(isolation.exit_reason(-9, ReplicaLimits(GiB), "web-0", []))
    assert reason == "oom-killed: memory limit 1 GiB"
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("show ") and lines[0].endswith("meshserve-replica-web\\x2d0.scope")
    assert lines[1] == "reset-failed meshserve-replica-web\\x2d0.scope"


def test_systemd_exit_reason_from_a_lingering_cgroups_memory_events(tmp_path, monkeypatch):
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    (cgroup / "memory.events").write_text(MEMORY_EVENTS_AFTER_OOM)
    systemctl, _ = _fake_systemctl(tmp_path, f"Result=success\nControlGroup=/{cgroup.name}\n")
    import meshserve.node_agent.isolation as isolation_module
    real_read = isolation_module._read
    monkeypatch.setattr(isolation_module, "_read",
                        lambda path: real_read(path.replace("/sys/fs/cgroup", str(tmp_path))))
    reason = asyncio.run(SystemdIsolation(systemctl=systemctl).exit_reason(-9, ReplicaLimits(256 * MiB), "r", []))
    assert reason == "oom-killed: memory limit 256 MiB"


def test_a_lingering_scope_is_stopped_after_its_main_process_exits(tmp_path):
    systemctl, calls = _fake_systemctl(tmp_path, "Result=success\nControlGroup=/system.slice/x.scope\n")
    assert asyncio.run(SystemdIsolation(systemctl=systemctl).exit_reason(1, ReplicaLimits(GiB), "r", [])) is None
    assert "stop --no-block meshserve-replica-r.scope" in calls.read_text().splitlines()


def test_systemd_exit_without_oom_or_without_systemctl_has_no_reason(tmp_path):
    systemctl, calls = _fake_systemctl(tmp_path, "Result=success\nControlGroup=\n")
    assert asyncio.run(SystemdIsolation(systemctl=systemctl).exit_reason(1, ReplicaLimits(GiB), "r", [])) is None
    assert "reset-failed" not in calls.read_text()
    missing = SystemdIsolation(systemctl=str(tmp_path / "absent"))
    assert asyncio.run(missing.exit_reason(-9, ReplicaLimits(GiB), "r", [])) is None


def test_rlimit_exit_reason_only_when_an_allocation_failed():
    isolation, limits = RlimitIsolation(), ReplicaLimits(256 * MiB)
    tail = ["numpy.core._exceptions._ArrayMemoryError: Unable to allocate 2.00 GiB for an array"]
    assert asyncio.run(isolation.exit_reason(1, limits, "r", tail)) == \
        "exceeded its memory limit: 256 MiB (RLIMIT_DATA)"
    assert asyncio.run(isolation.exit_reason(1, limits, "r", ["RuntimeError: boom"])) is None
    openblas = ["OpenBLAS error: Memory allocation still failed after 10 retries, giving up."]
    assert asyncio.run(isolation.exit_reason(1, limits, "r", openblas)) is not None
    assert asyncio.run(isolation.exit_reason(0, limits, "r", tail)) is None
    assert asyncio.run(isolation.exit_reason(1, ReplicaLimits(), "r", tail)) is None
    assert asyncio.run(NoIsolation().exit_reason(-9, limits, "r", tail)) is None


# ---------------------------------------------------------------- rlimit command, for real


def test_rlimit_wrapper_sets_rlimit_data_in_the_real_child_and_leaves_unbooked_replicas_alone():
    probe = [sys.executable, "-c", "import resource; print(resource.getrlimit(resource.RLIMIT_DATA)[0])"]
    assert RlimitIsolation().wrap(probe, ReplicaLimits(), "r") == probe
    command = RlimitIsolation().wrap(probe, ReplicaLimits(300 * MiB), "r")
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
    assert int(out) == (300 * MiB if hard == resource.RLIM_INFINITY else min(300 * MiB, hard))


# ---------------------------------------------------------------- choosing a strategy


def test_explicit_strategies_and_auto_fall_back_with_a_log_line(caplog):
    caplog.set_level("INFO")
    assert isinstance(asyncio.run(choose_isolation("none")), NoIsolation)
    assert isinstance(asyncio.run(choose_isolation("rlimit")), RlimitIsolation)
    problem = asyncio.run(systemd_problem(user=os.geteuid() != 0))
    chosen = asyncio.run(choose_isolation("auto"))
    if problem is None:
        assert isinstance(chosen, SystemdIsolation)
    else:
        assert isinstance(chosen, RlimitIsolation)
        assert f"rlimit, not systemd ({problem})" in caplog.text


def test_systemd_asked_for_but_unavailable_is_refused_with_the_reason():
    with pytest.raises(IsolationUnavailable, match="--isolation systemd: .*(systemd|absent)"):
        asyncio.run(choose_isolation("systemd", systemd_run="/nonexistent/absent-systemd-run"))
    with pytest.raises(IsolationUnavailable, match="unknown isolation"):
        asyncio.run(choose_isolation("cgroups"))


def test_the_node_agent_refuses_to_start_with_systemd_isolation_where_systemd_cannot_work():
    problem = asyncio.run(systemd_problem(user=os.geteuid() != 0))
    if problem is None:
        pytest.skip("systemd-run --scope works on this host: the refusal cannot be shown here")
    agent = subprocess.run([sys.executable, "-m", "meshserve.node_agent", "--scheduler", "127.0.0.1:1",
                            "--name", "iso", "--isolation", "systemd", "--state-dir", "/nonexistent"],
                           capture_output=True, text=True, timeout=60)
    assert agent.returncode != 0
    assert f"node-agent: --isolation systemd: {problem}" in agent.stderr


# ---------------------------------------------------------------- real replicas outgrowing their memory


def _hog(replica_id: str, booked: int, hog: int) -> ReplicaSpec:
    return ReplicaSpec.create(replica_id, model_repository=AGENT_MODELS, model_name="memory_hog",
                              env={MEMORY_ENV: str(booked), CPU_ENV: "1", "MEMORY_HOG_BYTES": str(hog)})


async def _outcome(isolation, *specs: ReplicaSpec) -> dict[str, object]:
    """Run ``specs`` until each is ready or has failed once; their statuses by id."""
    supervisor = Supervisor(ReplicaOptions(isolation=isolation, startup_timeout_s=READY_TIMEOUT_S,
                                           stop_grace_s=20.0, backoff=Backoff(initial_s=30.0, max_s=30.0)))
    try:
        supervisor.apply(specs)
        statuses = await supervisor.wait_for(
            lambda s: all(r.state == "ready" or r.exit_code != 0 for r in s), READY_TIMEOUT_S * 2)
        return {status.replica_id: status for status in statuses}
    finally:
        await supervisor.drain_all()


def test_real_replica_past_its_rlimit_dies_and_the_reason_says_so():
    statuses = asyncio.run(_outcome(RlimitIsolation(), _hog("greedy", booked=768 * MiB, hog=2 * GiB),
                                    _hog("modest", booked=768 * MiB, hog=16 * MiB)))
    greedy, modest = statuses["greedy"], statuses["modest"]
    assert greedy.state == "failed" and greedy.exit_code == 1
    assert greedy.message.startswith("exceeded its memory limit: 768 MiB (RLIMIT_DATA); exited with code 1")
    assert "Unable to allocate" in greedy.message                   # the runtime's own words, in the tail
    assert modest.state == "ready" and modest.exit_code == 0        # the same limit leaves room for a modest one


def test_a_booking_too_small_for_the_runtime_itself_says_so_instead_of_a_bare_exit():
    """64 MiB does not hold the runtime's imports (OpenBLAS's buffers): the reason names the limit."""
    statuses = asyncio.run(_outcome(RlimitIsolation(), _hog("tiny", booked=64 * MiB, hog=0)))
    assert statuses["tiny"].message.startswith("exceeded its memory limit: 64 MiB (RLIMIT_DATA); exited with code 1")


def test_real_replica_past_its_memory_max_is_reported_oom_killed():
    """The kernel OOM-kills a replica past MemoryMax in its systemd scope; the agent says so."""
    problem = asyncio.run(systemd_problem(user=os.geteuid() != 0))
    if problem is not None:
        pytest.skip(f"no cgroup v2 scope can be made for this test: {problem}")
    isolation = SystemdIsolation(user=os.geteuid() != 0)
    statuses = asyncio.run(_outcome(isolation, _hog(f"oom-{os.getpid()}", booked=256 * MiB, hog=1 * GiB)))
    [status] = statuses.values()
    assert status.state == "failed" and status.exit_code == -9
    assert status.message.startswith("oom-killed: memory limit 256 MiB; exited with code -9 (SIGKILL)")
