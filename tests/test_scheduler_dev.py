"""`scheduler dev --once`: the single-host mesh comes up, serves through its proxy, and leaves nothing running."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO_ROOT

# Starting a scheduler, an agent and five replicas on a loaded 2-core machine; bounds a hang only.
DEV_TIMEOUT_S = 300


def _processes_mentioning(*needles: str) -> list[str]:
    """Command lines of live processes that contain any of ``needles``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    command = handle.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(needle in command for needle in needles):
                found.append(command)
    return found


def test_dev_mesh_places_the_examples_serves_them_and_stops_cleanly(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "meshserve.scheduler", "dev", "--once", "--listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0",
         "--state-dir", str(tmp_path / "state"), "--fake-gpus", "1x24GiB"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=DEV_TIMEOUT_S)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert "FAKE 1x24GiB (--fake-gpus)" in output
    for deployment in ("add-sub", "mlp-onnx", "textgen"):
        assert f"deployment/{deployment} created" in output
    assert "add_sub through the proxy 127.0.0.1:" in output and "INPUT0+1 = [1. 2. 3." in output
    assert "textgen through the proxy (streamed): The scheduler places" in output
    for daemon in ("scheduler", "node-agent", "proxy"):   # metrics on by default, each URL printed
        assert re.search(rf"^  {daemon}: http://127\.0\.0\.1:\d+/metrics$", output, re.MULTILINE), output[-3000:]
    assert (tmp_path / "state" / "state.db").exists()
    scheduler_address = re.search(r"meshserve scheduler listening on (\S+)", output).group(1)
    # The scheduler carries the state dir, the agent the scheduler's address; replicas die with the agent.
    assert _processes_mentioning(str(tmp_path / "state"), f"--scheduler {scheduler_address}") == []
