"""The benchmarks still run end to end (numbers are not checked: speed is a benchmark, not a test)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO_ROOT

# A --quick run takes about ten seconds; this bounds a hang, it is not a speed claim.
BENCH_TIMEOUT_S = 180


def test_replica_benchmark_quick_run_prints_its_figures_as_json():
    run = subprocess.run([sys.executable, "-m", "bench.replica", "--quick"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "replica"
    for cell in ("add_sub", "echo_fp32", "fixed_cost"):
        assert cell in figures
    assert set(figures["ratios"]) >= {"fixed_cost_c32_batched_over_unbatched"}
    assert figures["add_sub"]["c16"]["batching"]["errors"] == 0


def test_tls_benchmark_quick_run_prints_mtls_over_plaintext_as_json():
    run = subprocess.run([sys.executable, "-m", "bench.tls", "--quick"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "tls"
    assert set(figures["ratios"]) == {"tiny_c1", "tiny_c16", "64KB_c1", "64KB_c16"}
    for cells in figures["cells"].values():
        for cell in cells.values():
            assert cell["plaintext"]["errors"] == 0 and cell["mtls"]["errors"] == 0


def test_peers_benchmark_requires_the_peers_folder_instead_of_a_default_outside_the_repository():
    run = subprocess.run([sys.executable, "-m", "bench.peers", "--quick"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "--peers-dir" in run.stderr


def test_peers_benchmark_skips_peers_missing_from_the_given_folder_and_measures_meshserve(tmp_path):
    peers, install = tmp_path / "peers", tmp_path / "install"
    peers.mkdir()
    run = subprocess.run([sys.executable, "-m", "bench.peers", "--quick", "--peers-dir", str(peers),
                          "--install-dir", str(install)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "peers"
    assert set(figures["skipped"]) == {"triton", "mlserver"}
    assert all(str(peers) in why for why in figures["skipped"].values()), figures["skipped"]
    for cell in ("c1", "c16"):
        assert figures["cells"][cell]["meshserve"]["errors"] == 0


def test_artifacts_benchmark_quick_run_prints_its_figures_as_json():
    run = subprocess.run([sys.executable, "-m", "bench.artifacts", "--quick"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == "artifacts" and figures["uploads"] == 1
    assert {"apply_to_first_call_s", "miss_start_s", "hit_start_s", "miss_over_hit"} <= set(figures)
