"""One runtime replica, measured: batching on vs off, tensor transfer, batching payoff.

    .venv/bin/python -m bench.replica [--duration 5] [--rounds 2] [--quick]

Cells (our load generator, bench/loadgen.py, one channel, closed loop):

- ``add_sub`` at concurrency 1 and 16, dynamic batching on and off (same
  model, same config less ``dynamic_batching``, two runtimes up at once);
- ``echo_fp32`` with a 4 MB FP32 tensor each way, concurrency 1 and 16;
- ``fixed_cost`` (5 ms per call whatever the batch) at concurrency 32,
  batched vs unbatched: the payoff of batching when a call has a fixed cost.

A cell's ``--duration`` is split into ``--rounds`` slices that alternate
between the two sides of a ratio, so drift on the shared machine hits both.
Human lines first; the last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import workloads
from bench.cli import add_cell_arguments, settle_cell_arguments
from bench.loadgen import LoadResult, alternate, measure_cell
from bench.servers import RuntimeServer, stop_on_signals

ECHO_ELEMENTS = 1_000_000  # 4 MB of FP32: under gRPC's 4 MiB default message limit with framing
FIXED_COST_CONCURRENCY = 32




def ratio(numerator: LoadResult, denominator: LoadResult) -> float | None:
    if denominator.throughput <= 0:
        return None
    return round(numerator.throughput / denominator.throughput, 2)


def describe(label: str, result: LoadResult, extra: str = "") -> str:
    figures = result.to_dict()
    line = (f"  {label:<32} {figures['throughput']:>9.1f} infer/s   p50 {figures['p50_ms']} ms"
            f"   p99 {figures['p99_ms']} ms   errors {figures['errors']}{extra}")
    if result.first_error:
        line += f"\n    first error: {result.first_error}"
    return line


def bench_batching_pair(model_dir: Path, workdir: Path, request, checker, concurrencies, args):
    """Batched and unbatched runtimes of the same model, both up; cells per concurrency."""
    batched = workloads.make_repository(model_dir, workdir, batching=True)
    unbatched = workloads.make_repository(model_dir, workdir, batching=False)
    assert workloads.has_dynamic_batching(batched, model_dir.name)
    assert not workloads.has_dynamic_batching(unbatched, model_dir.name)
    cells = {}
    with RuntimeServer(batched, name=f"{model_dir.name} batched") as on, \
            RuntimeServer(unbatched, name=f"{model_dir.name} unbatched") as off:
        for concurrency in concurrencies:
            got = alternate({"batching": on.address, "no_batching": off.address},
                            request, checker, concurrency, args)
            cell = {name: result.to_dict() for name, result in got.items()}
            cell["ratio_batched_over_unbatched"] = ratio(got["batching"], got["no_batching"])
            cells[f"c{concurrency}"] = cell
            for name, result in got.items():
                print(describe(f"{model_dir.name} c={concurrency} {name}", result), flush=True)
            print(f"  -> batched / unbatched throughput: {cell['ratio_batched_over_unbatched']}x",
                  flush=True)
    return cells


def bench_echo(workdir: Path, args):
    repository = workloads.make_repository(workloads.BENCH_MODELS / "echo_fp32", workdir)
    request = workloads.echo_request("echo_fp32", (ECHO_ELEMENTS,))
    megabytes = ECHO_ELEMENTS * 4 / 1e6
    cells = {}
    with RuntimeServer(repository, name="echo_fp32") as server:
        for concurrency in (1, 16):
            result = measure_cell(server.address, request, workloads.check_echo, concurrency,
                                  args.duration, args.warmup)
            cell = result.to_dict()
            cell["tensor_MB"] = megabytes
            cell["MB_per_s_each_way"] = round(result.throughput * megabytes, 1)
            cells[f"c{concurrency}"] = cell
            print(describe(f"echo_fp32 {megabytes:g} MB c={concurrency}", result,
                           f"   {cell['MB_per_s_each_way']} MB/s each way"), flush=True)
    return cells


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cell_arguments(parser, "alternating slices per batched/unbatched cell (default 2)")
    return settle_cell_arguments(parser.parse_args(argv))


def main(argv=None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    started = time.monotonic()
    print(f"bench.replica: {args.duration:g} s per cell in {args.rounds} round(s), "
          f"{os.cpu_count()} CPUs, load generator on the same machine", flush=True)
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-") as tmp:
        workdir = Path(tmp)
        print("add_sub (examples/models/add_sub), batching on vs off:", flush=True)
        add_sub = bench_batching_pair(workloads.EXAMPLE_MODELS / "add_sub", workdir,
                                      workloads.add_sub_request(), workloads.check_add_sub,
                                      (1, 16), args)
        print(f"echo_fp32, {ECHO_ELEMENTS * 4 / 1e6:g} MB tensor in and out:", flush=True)
        echo = bench_echo(workdir, args)
        print(f"fixed_cost (5 ms per call), concurrency {FIXED_COST_CONCURRENCY}, "
              "batched vs unbatched:", flush=True)
        fixed = bench_batching_pair(workloads.BENCH_MODELS / "fixed_cost", workdir,
                                    workloads.echo_request("fixed_cost", (1, 16)),
                                    workloads.check_echo, (FIXED_COST_CONCURRENCY,), args)
    summary = {
        "benchmark": "replica",
        "duration_s_per_cell": args.duration,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "add_sub": add_sub,
        "echo_fp32": echo,
        "fixed_cost": fixed,
        "ratios": {
            "add_sub_c1_batched_over_unbatched": add_sub["c1"]["ratio_batched_over_unbatched"],
            "add_sub_c16_batched_over_unbatched": add_sub["c16"]["ratio_batched_over_unbatched"],
            f"fixed_cost_c{FIXED_COST_CONCURRENCY}_batched_over_unbatched":
                fixed[f"c{FIXED_COST_CONCURRENCY}"]["ratio_batched_over_unbatched"],
        },
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(f"batching payoff at a fixed 5 ms per call: "
          f"{summary['ratios'][f'fixed_cost_c{FIXED_COST_CONCURRENCY}_batched_over_unbatched']}x",
          flush=True)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench.replica: interrupted; every server it started is stopped", file=sys.stderr)
        sys.exit(130)
