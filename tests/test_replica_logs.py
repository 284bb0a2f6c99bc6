"""Each replica's output in a rotated file, the crash reason, and `scheduler ctl logs` through the scheduler.

Unit tests of ``crash_reason`` and ``ReplicaLogs`` on real files; then a real
supervisor running a real replica that prints and then raises; then real
scheduler and agent processes and `scheduler ctl logs` as a real command.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys
import time

import pytest
from mesh_harness import CONVERGE_TIMEOUT_S, START_TIMEOUT_S, Admin, Mesh

from meshserve.common.backoff import Backoff
from meshserve.node_agent.crash_reason import REASON_CHARS, crash_reason
from meshserve.node_agent.log_requests import LogRequests
from meshserve.node_agent.replica import ReplicaOptions, ReplicaSpec
from meshserve.node_agent.replica_logs import ReplicaLogs
from meshserve.node_agent.supervisor import Supervisor
from meshserve.protos.mesh import control_pb2 as pb
from meshserve.scheduler.log_relay import QUEUE_CHUNKS, LogRelay

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
AGENT_MODELS = str(REPO_ROOT / "tests" / "models" / "agent")
WAIT_S = 60.0

CHAINED = """\
INFO starting
Traceback (most recent call last):
  File "model.py", line 9, in _open_weights
    raise FileNotFoundError(path)
FileNotFoundError: /nowhere/model.bin

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "model.py", line 19, in __init__
    raise ValueError("weights are missing") from err
    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
ValueError: weights are missing
WARNING model 'm' is not available
""".splitlines()


# ---------------------------------------------------------------- crash reason


def test_the_reason_is_the_last_exception_not_the_traceback_header():
    assert crash_reason(CHAINED) == "ValueError: weights are missing"


def test_a_traceback_cut_off_before_its_exception_falls_back_to_an_earlier_one():
    assert crash_reason(CHAINED[:5]) == "FileNotFoundError: /nowhere/model.bin"


def test_without_a_traceback_the_last_error_line_then_the_last_line():
    assert crash_reason(["loading", "CUDA error: out of memory", "bye"]) == "CUDA error: out of memory"
    assert crash_reason(["loading", "", "bye  "]) == "bye"
    assert crash_reason(["", "   "]) == ""
    assert crash_reason([]) == ""


def test_a_long_reason_is_cut_never_to_nothing():
    reason = crash_reason(["RuntimeError: " + "x" * 5000])
    assert reason.startswith("RuntimeError: xxx") and len(reason) == REASON_CHARS and reason.endswith("…")


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("bad", ["", "../escape", "a/b", ".hidden", "x" * 201, "nul\0byte", "sp ace"])
def test_hostile_replica_ids_name_no_file(tmp_path, bad):
    logs = ReplicaLogs(tmp_path)
    with pytest.raises(ValueError):
        logs.writer(bad)
    assert list(tmp_path.iterdir()) == []


def test_tail_is_bounded_by_lines_and_bytes_and_spans_a_rotation(tmp_path):
    logs = ReplicaLogs(tmp_path, max_bytes=1000, backups=2)
    writer = logs.writer("r-1")
    for index in range(200):
        writer.write(f"line {index:04d}")
    writer.close()
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["r-1.log", "r-1.log.1", "r-1.log.2"]        # older files beyond 2 backups are gone
    assert all(path.stat().st_size <= 1000 + 20 for path in tmp_path.iterdir())

    async def main():
        lines, _ = await logs.tail("r-1", 5, 1 << 20)
        assert lines == [f"line {index:04d}" for index in range(195, 200)]
        current = (tmp_path / "r-1.log").read_text().count("\n")
        lines, _ = await logs.tail("r-1", current + 3, 1 << 20)   # reaches into r-1.log.1
        assert lines == [f"line {index:04d}" for index in range(200 - current - 3, 200)]
        lines, _ = await logs.tail("r-1", 1000, 50)                # 50 bytes: whole lines only
        assert lines == ["line 0196", "line 0197", "line 0198", "line 0199"]

    asyncio.run(main())


def test_follow_yields_new_lines_across_a_rotation_and_ends_when_done(tmp_path):
    logs = ReplicaLogs(tmp_path, max_bytes=200, backups=1)
    writer = logs.writer("r-1")
    writer.write("before")

    async def main():
        _, offset = await logs.tail("r-1", 10, 1 << 20)
        seen: list[str] = []
        finished = asyncio.Event()
        last_seen = asyncio.Event()

        async def read():
            async for lines in logs.follow("r-1", offset, finished.is_set):
                seen.extend(lines)
                if "new 39" in lines:
                    last_seen.set()

        reader = asyncio.create_task(read())
        async with asyncio.timeout(WAIT_S):
            for index in range(40):                  # ~400 bytes: the file rotates at least once
                writer.write(f"new {index:02d}")
                await asyncio.sleep(0.02)
            await last_seen.wait()
            finished.set()
            await reader
        assert (tmp_path / "r-1.log.1").exists()
        assert seen == [f"new {index:02d}" for index in range(40)]   # in order, none lost or repeated

    asyncio.run(main())
    writer.close()


def test_log_requests_answer_an_unknown_replica_and_a_hostile_id_with_an_error(tmp_path):
    async def main():
        sent: list[pb.AgentMessage] = []
        both = asyncio.Event()

        async def send(message):
            sent.append(message)
            if len(sent) == 2:
                both.set()

        requests = LogRequests(ReplicaLogs(tmp_path), Supervisor(ReplicaOptions()))
        requests.handle(pb.LogsRequest(request_id=1, replica_id="nobody", tail_lines=10), send)
        requests.handle(pb.LogsRequest(request_id=2, replica_id="../../etc/passwd", tail_lines=10), send)
        async with asyncio.timeout(WAIT_S):
            await both.wait()
        errors = {m.logs.request_id: m.logs for m in sent}
        assert errors[1].end and "no output kept for replica 'nobody'" in errors[1].error
        assert errors[2].end and "cannot name a log file" in errors[2].error

    asyncio.run(main())


# ---------------------------------------------------------------- a real replica


def test_a_replica_that_prints_then_raises_keeps_its_output_and_names_the_exception(tmp_path):
    """The status message's first line names the exception (it used to end in "; last output:")."""
    async def main():
        supervisor = Supervisor(ReplicaOptions(logs=ReplicaLogs(tmp_path), backoff=Backoff(initial_s=30.0)))
        supervisor.apply([ReplicaSpec.create("r-1", model_repository=AGENT_MODELS, model_name="print_then_raise")])
        try:
            statuses = await supervisor.wait_for(lambda s: s and s[0].state == "failed", WAIT_S)
        finally:
            await supervisor.drain_all()
        first_line = statuses[0].message.splitlines()[0]
        assert first_line.startswith("exited with code 1: ValueError: weights for print_then_raise are missing")
        kept = (tmp_path / "r-1.log").read_text()
        assert "print_then_raise: loading weights from /nowhere/model.bin" in kept      # stdout
        assert "print_then_raise: a warning on stderr" in kept                          # stderr
        assert "Traceback (most recent call last):" in kept                             # logged with its traceback
        assert 'raise ValueError("weights for print_then_raise are missing") from err' in kept

    asyncio.run(main())


# ---------------------------------------------------------------- ctl logs, through the scheduler

FAILING_DEPLOYMENT = f"""kind: Deployment
name: failing
model:
  repository: {AGENT_MODELS}
  name: print_then_raise
replicas: 1
resources:
  gpus: 1
  gpu_memory: 1GiB
  cpu: 100m
"""


def ctl(address: str, *args: str, timeout: float = WAIT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshserve.scheduler", "ctl", "--server", address, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_ctl_logs_shows_what_a_replica_printed_and_its_traceback_through_the_scheduler(tmp_path):
    mesh_ = Mesh()
    admin = None
    try:
        scheduler = mesh_.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "s1")
        mesh_.agent("node-a", scheduler.address, fake_gpus="1x8GiB")
        admin = Admin(scheduler.address)
        admin.apply(FAILING_DEPLOYMENT)
        [replica] = admin.wait_for(
            lambda: [r for r in admin.replicas("failing") if r.state == "failed" and "ValueError" in r.reason],
            "the replica to fail with its reason", CONVERGE_TIMEOUT_S, mesh_)
        assert replica.reason.splitlines()[0].startswith(
            "exited with code 1: ValueError: weights for print_then_raise are missing"), replica.reason

        # Follow, soon after the first crash (the next restart is at most a few seconds away): the last
        # line of the tail, then what the restarted process prints, until --follow-for ends it.
        followed = ctl(scheduler.address, "logs", replica.id, "--tail", "1", "--follow", "--follow-for", "12",
                       timeout=START_TIMEOUT_S)
        assert followed.returncode == 0, followed.stderr
        assert "print_then_raise: loading weights from /nowhere/model.bin" in followed.stdout, followed.stdout

        shown = ctl(scheduler.address, "logs", replica.id, "--tail", "200")
        assert shown.returncode == 0, shown.stderr
        assert "print_then_raise: loading weights from /nowhere/model.bin" in shown.stdout
        assert "print_then_raise: a warning on stderr" in shown.stdout
        assert "Traceback (most recent call last):" in shown.stdout
        assert "ValueError: weights for print_then_raise are missing" in shown.stdout

        two = ctl(scheduler.address, "logs", f"replica/{replica.id}", "--tail", "2")
        assert two.returncode == 0 and len(two.stdout.splitlines()) == 2, two

        unknown = ctl(scheduler.address, "logs", "no-such-replica")
        assert unknown.returncode != 0 and "no replica named 'no-such-replica'" in unknown.stderr
    finally:
        if admin is not None:
            admin.close()
        mesh_.close()


# ---------------------------------------------------------------- the scheduler's relay


def test_the_relay_takes_chunks_only_from_the_stream_asked_and_bounds_what_waits():
    async def main():
        relay = LogRelay()
        channel, other = asyncio.Queue(), asyncio.Queue()
        with relay.request("node-a", channel, pb.LogsRequest(replica_id="r-1")) as chunks:
            sent = channel.get_nowait().logs
            assert sent.replica_id == "r-1" and sent.request_id > 0
            relay.deliver("node-b", channel, pb.LogsChunk(request_id=sent.request_id, lines=["forged"]))
            relay.deliver("node-a", other, pb.LogsChunk(request_id=sent.request_id, lines=["old stream"]))
            relay.deliver("node-a", channel, pb.LogsChunk(request_id=sent.request_id + 1, lines=["unknown id"]))
            assert chunks.empty()
            for index in range(QUEUE_CHUNKS + 10):     # a reader that does not read
                relay.deliver("node-a", channel, pb.LogsChunk(request_id=sent.request_id, lines=[str(index)]))
            assert chunks.qsize() == QUEUE_CHUNKS + 1
            assert [chunks.get_nowait() for _ in range(QUEUE_CHUNKS + 1)][-1].error.startswith("the reader fell")
            assert channel.get_nowait().logs == pb.LogsRequest(request_id=sent.request_id, cancel=True)
        assert channel.empty()                          # closed once only

        with relay.request("node-a", channel, pb.LogsRequest(replica_id="r-2")) as chunks:
            channel.get_nowait()
            relay.stream_ended(channel)
            assert chunks.get_nowait() is None

    asyncio.run(main())


def test_prune_removes_only_old_files_of_replicas_not_running(tmp_path):
    logs = ReplicaLogs(tmp_path, max_bytes=100, backups=1)
    for replica_id in ("gone.logger-1", "running-1", "recent-1"):
        writer = logs.writer(replica_id)
        for index in range(30):
            writer.write(f"{replica_id} line {index}")     # rotates: REPLICA.log and REPLICA.log.1
        writer.close()
    (tmp_path / "notes.txt").write_text("not ours")
    week_ago = time.time() - 8 * 24 * 3600
    for path in tmp_path.iterdir():
        if not path.name.startswith("recent-1"):
            os.utime(path, (week_ago, week_ago))

    removed = asyncio.run(logs.prune({"running-1"}))
    assert sorted(removed) == ["gone.logger-1.log", "gone.logger-1.log.1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt", "recent-1.log", "recent-1.log.1", "running-1.log", "running-1.log.1"]
