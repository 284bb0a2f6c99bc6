"""A second `scheduler dev` on the state directory or the ports of a running one refuses to start.

It exits 1 with a message naming what is taken, before starting any child, and
the first keeps its store, its lock and its agents.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

from conftest import REPO_ROOT
from daemons import Daemon

# The refused one exits before it starts a child; one that is not refused would run until killed.
REFUSE_TIMEOUT_S = 30.0


def _dev(state_dir: pathlib.Path, empty: pathlib.Path, listen: str = "127.0.0.1:0",
         proxy_listen: str = "127.0.0.1:0") -> list[str]:
    return ["meshserve.scheduler", "dev", "--listen", listen, "--proxy-listen", proxy_listen, "--state-dir", str(state_dir),
            "--fake-gpus", "1x24GiB", "--deployments", str(empty)]


def _second(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=REFUSE_TIMEOUT_S)


def _nodes(scheduler: str) -> str:
    return subprocess.run([sys.executable, "-m", "meshserve.scheduler", "ctl", "--server", scheduler, "get", "nodes"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=REFUSE_TIMEOUT_S).stdout


def test_second_dev_on_the_same_state_dir_or_ports_refuses_and_leaves_the_first_alone(tmp_path):
    state, empty = tmp_path / "state", tmp_path / "no-deployments"
    empty.mkdir()
    first = Daemon(_dev(state, empty))
    try:
        scheduler = first.wait_for(r"meshserve scheduler listening on (\S+:\d+)")
        proxy_address = first.wait_for(r"proxy listening on (\S+:\d+)")
        first.wait_for(r"(registered) with scheduler")  # its agent, in the forwarded output
        lock_before = (state / "dev.lock").read_text()
        policy_before = (state / "dev-policy.yaml").stat().st_mtime_ns

        same_dir = _second(_dev(state, empty))
        assert same_dir.returncode == 1, same_dir.stdout + same_dir.stderr
        assert f"state directory {state} is in use by another `scheduler dev` (pid {first.proc.pid})" \
            in same_dir.stderr
        assert same_dir.stdout.count("listening") == 0  # nothing was started

        for other, listen, proxy_listen, taken in (
                ("a", scheduler, "127.0.0.1:0", scheduler), ("b", "127.0.0.1:0", proxy_address, proxy_address)):
            run = _second(_dev(tmp_path / other, empty, listen, proxy_listen))
            assert run.returncode == 1, run.stdout + run.stderr
            assert f"cannot listen on {taken}: address already in use" in run.stderr
            assert not (tmp_path / other / "state.db").exists()

        assert (state / "dev.lock").read_text() == lock_before == f"{first.proc.pid}\n"
        assert (state / "dev-policy.yaml").stat().st_mtime_ns == policy_before  # written by the first only
        assert "fake" in _nodes(scheduler)  # the first's agent is still registered with it
        assert first.proc.poll() is None
    finally:
        first.stop()
