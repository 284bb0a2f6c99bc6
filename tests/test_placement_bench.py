"""The placement benchmark still runs end to end (its speed is a benchmark, not a test)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO_ROOT

# A --quick run takes well under a second; this bounds a hang, it is not a speed claim.
BENCH_TIMEOUT_S = 60


def test_placement_benchmark_quick_run_prints_its_figures_as_json():
    run = subprocess.run([sys.executable, "bench/placement.py", "--quick"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "placement"
    assert figures["placed"] + figures["unschedulable"] == figures["replicas"] == 500
    assert figures["placed"] > 0 and figures["placements_per_s"] > 0
    for run_name in ("mixed", "pack", "spread"):
        assert figures[run_name]["gpus_overcommitted"] == 0
        assert figures[run_name]["hosts_overcommitted"] == 0
        assert figures[run_name]["rule_violations"] == 0
        assert 0 < figures[run_name]["packing_efficiency"] <= 1
    assert figures["filters"]["mismatches"] == 0
    assert figures["ingestion"]["reports"] == 50
    assert {"rebuild_ms", "copy_ms", "rebuild_core_pct_at_1hz"} <= set(figures["ingestion"])
