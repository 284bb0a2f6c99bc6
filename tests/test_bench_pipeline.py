"""bench.pipeline still runs end to end (figures are not checked: speed is a benchmark, not a test)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO_ROOT

# A --quick run takes under ten seconds (three runtimes, then one); this bounds a hang.
BENCH_TIMEOUT_S = 180


def test_pipeline_benchmark_quick_run_prints_both_sections_without_errors():
    run = subprocess.run([sys.executable, "-m", "bench.pipeline", "--quick"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "pipeline"

    locality = figures["data_locality"]
    assert locality["steps"] == ["expand", "reduce"] and locality["remote_step"] == "reduce"
    assert locality["remote_step_calls"] > 0  # the split side really crossed to the other runtime
    for concurrency in ("c1", "c8"):
        cell = locality["cells"][concurrency]
        for side in ("colocated", "split"):
            assert cell[side]["errors"] == 0, cell[side]
            assert cell[side]["requests"] > 0, cell[side]
        assert "split_p50/colocated_p50" in cell and "colocated/split_throughput" in cell
    assert set(locality["goals"]) == {"p50_split_over_colocated", "throughput_colocated_over_split"}

    shm = figures["shared_memory"]
    for side in ("shared_memory", "grpc"):
        assert shm[side]["errors"] == 0, shm[side]
        assert shm[side]["calls"] > 0, shm[side]
    assert "ratio_shm_over_grpc" in shm
    assert figures["errors"] == 0
