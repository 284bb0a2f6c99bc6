"""A replica whose model does not load is restarted a bounded number of times, then stays failed with the load
error as its reason until its deployment's revision changes (issue 11).

Fakes first (counts and backoff under a fake clock), then a real runtime whose model imports a module no host
has, under a real supervisor and in a real mesh (scheduler + node agent) where the reason reaches ``get``.
"""

from __future__ import annotations

import asyncio
import pathlib
import time

from mesh_harness import REPO_ROOT, Admin
from test_node_agent_supervisor import READY_TIMEOUT_S, FakeClock, FakeLauncher, fake_supervisor, state_of

from meshserve.common.backoff import Backoff
from meshserve.node_agent.replica import ReplicaOptions, ReplicaSpec
from meshserve.node_agent.supervisor import Supervisor

MISSING_DEPENDENCY = str(pathlib.Path(REPO_ROOT) / "tests" / "models" / "missing_dependency")
MODEL = "needs_missing_module"
IMPORT_ERROR = "ModuleNotFoundError: No module named 'meshserve_test_no_such_module'"
# How long a replica that gave up is watched for another start: many times its largest backoff delay.
QUIET_WINDOW_S = 3.0


def gave_up(replica_id: str, **expected):
    """The replica is failed for good: its message says it gave up (between restarts it is failed too)."""
    check = state_of(replica_id, state="failed", pid=0, **expected)
    return lambda statuses: check(statuses) and "in a row" in next(
        s.message for s in statuses if s.replica_id == replica_id)


def test_failed_starts_give_up_and_a_new_revision_starts_again():
    async def main():
        clock = FakeClock()
        launcher = FakeLauncher("crash")
        supervisor = fake_supervisor(launcher, clock, backoff=Backoff(initial_s=1.0, max_s=4.0), max_failed_starts=3)
        supervisor.apply([ReplicaSpec.create("r1", revision=1, model_name="m")])
        status = (await supervisor.wait_for(gave_up("r1", restarts=2), 5))[0]
        assert status.message.startswith("RuntimeError: boom\n(failed to start 3 times in a row; not restarted "
                                         "until the deployment's revision changes) exited with code 3")
        for _ in range(50):          # the loop runs freely; with backoff a restart would come at once here
            await asyncio.sleep(0)
        assert len(launcher.processes) == 3 and clock.sleeps == [1.0, 2.0]
        assert supervisor.status("r1") == status

        supervisor.apply([ReplicaSpec.create("r1", revision=1, model_name="m")])   # the same spec: still failed
        assert len(launcher.processes) == 3
        supervisor.apply([ReplicaSpec.create("r1", revision=2, model_name="m")])   # a new revision: tried again
        await supervisor.wait_for(gave_up("r1", revision=2, restarts=2), 5)
        assert len(launcher.processes) == 6
        await supervisor.drain_all()
        assert supervisor.status("r1").state == "stopped"

    asyncio.run(main())


def test_crashes_after_ready_are_not_failed_starts():
    async def main():
        launcher = FakeLauncher("serve")
        supervisor = fake_supervisor(launcher, FakeClock(), max_failed_starts=2)
        supervisor.apply([ReplicaSpec.create("r1")])
        for round_ in range(4):
            await supervisor.wait_for(state_of("r1", state="ready", restarts=round_), 5)
            launcher.processes[-1].crash(1)
        await supervisor.wait_for(state_of("r1", state="ready", restarts=4), 5)
        await supervisor.drain_all()

    asyncio.run(main())


def test_a_start_that_succeeds_resets_the_count():
    async def main():
        launcher = FakeLauncher("crash", "serve", "crash", "crash")
        supervisor = fake_supervisor(launcher, FakeClock(), max_failed_starts=2)
        supervisor.apply([ReplicaSpec.create("r1")])
        await supervisor.wait_for(state_of("r1", state="ready", restarts=1), 5)
        launcher.processes[-1].crash(1)                  # after ready: restarted; then two failed starts
        status = (await supervisor.wait_for(gave_up("r1", restarts=3), 5))[0]
        assert "failed to start 2 times in a row" in status.message and len(launcher.processes) == 4
        await supervisor.drain_all()

    asyncio.run(main())


def test_a_real_model_missing_its_module_fails_with_the_import_error_and_stays_failed():
    async def main():
        supervisor = Supervisor(ReplicaOptions(backoff=Backoff(initial_s=0.05, max_s=0.2), max_failed_starts=3,
                                               startup_timeout_s=READY_TIMEOUT_S, stop_grace_s=20.0))
        spec = ReplicaSpec.create("needs", revision=1, model_repository=MISSING_DEPENDENCY, model_name=MODEL)
        try:
            supervisor.apply([spec])
            failed = (await supervisor.wait_for(gave_up("needs", restarts=2),
                                                3 * READY_TIMEOUT_S))[0]
            assert failed.message.startswith(f"{MODEL}: {IMPORT_ERROR}\n(failed to start 3 times in a row")
            assert failed.exit_code == 1
            try:   # nothing may change any more: no restart, no new process
                await supervisor.wait_for(lambda statuses: statuses[0] != failed, QUIET_WINDOW_S)
                raise AssertionError(f"the replica changed after giving up: {supervisor.status('needs')}")
            except TimeoutError:
                pass
            supervisor.apply([ReplicaSpec.create("needs", revision=2, model_repository=MISSING_DEPENDENCY,
                                                    model_name=MODEL)])
            again = (await supervisor.wait_for(gave_up("needs", revision=2, restarts=2),
                                               3 * READY_TIMEOUT_S))[0]
            assert again.message.startswith(f"{MODEL}: {IMPORT_ERROR}\n")
        finally:
            await supervisor.drain_all()
        assert supervisor.status("needs").state == "stopped"

    asyncio.run(main())


def test_in_a_mesh_the_reason_reaches_the_operator_and_restarts_stop(cluster, tmp_path):
    scheduler = cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "deps")
    cluster.agent("host-a", scheduler.address, extra_args=("--max-failed-starts", "2"))
    admin = Admin(scheduler.address)
    try:
        assert admin.apply(f"kind: Deployment\nname: needs\nmodel: {{repository: {MISSING_DEPENDENCY}, "
                           f"name: {MODEL}}}\nresources: {{cpu: 100m}}\n") == ["deployment/needs created"]
        [replica] = admin.wait_for(
            lambda: [r for r in admin.replicas("needs") if r.state == "failed" and "in a row" in r.reason],
            "the replica to give up", mesh_=cluster)
        assert replica.reason.startswith(f"{MODEL}: {IMPORT_ERROR}\n(failed to start 2 times in a row")
        assert replica.restarts == 1
        deadline = time.monotonic() + QUIET_WINDOW_S
        while time.monotonic() < deadline:      # bounded: the window, one Get per 0.2 s
            [now] = admin.replicas("needs")
            assert (now.id, now.state, now.restarts, now.pid) == (replica.id, "failed", 1, 0)
            time.sleep(0.2)
    finally:
        admin.close()
