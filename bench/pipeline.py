"""Pipelines, measured: data locality of a two-step ensemble, and shared memory vs gRPC.

    .venv/bin/python -m bench.pipeline [--duration 5] [--warmup 1] [--rounds 2] [--calls 200] [--quick]

Two sections, each comparing two ways side by side in one run:

- ``data_locality``: the ensemble ``large_pipeline`` of
  ``examples/pipelines/large_tensor`` (expand -> a 4 MB FP32 intermediate ->
  reduce) at concurrency 1 and 8 (bench/loadgen.py, closed loop), served

  * ``colocated``: by ONE runtime holding the ensemble and both steps
    (``--model large_pipeline``): the intermediate stays in memory;
  * ``split``: the last step (``reduce``) in its own runtime
    (``--model reduce``), the ensemble and the first step in another with
    ``--remote-model reduce=HOST:PORT``: the 4 MB intermediate crosses gRPC
    between processes, as when a pipeline is split across two hosts.

  The request is built from the ensemble's declared inputs; one answer is
  checked against the step math (``sum = 156250 * sum(INPUT)``,
  ``mean = sum / 1e6``) before anything is timed, on both sides, and the
  split side must show the calls in the ``reduce`` replica's statistics.
- ``shared_memory``: a 4 MB FP32 echo (``bench/models/echo_fp32``) called with
  ``clients.SharedMemory`` (input and output through a registered POSIX
  region) vs a plain ``InferenceClient.infer`` (both ways through gRPC), one
  runtime, a bounded number of calls each in alternating rounds.

A cell's ``--duration`` is split into ``--rounds`` slices that alternate
between the two sides (ABBA), so drift on the shared machine hits both.
Human lines first; the last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from bench import workloads
from bench.cli import add_cell_arguments, settle_cell_arguments
from bench.loadgen import alternate, infer_request, output_arrays
from bench.servers import REPO_ROOT, RuntimeServer, stop_on_signals
from meshserve.clients import InferenceClient, SharedMemory
from meshserve.common import tensors
from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import model_config_pb2 as mc

PIPELINE_REPOSITORY = REPO_ROOT / "examples" / "pipelines" / "large_tensor"
ENSEMBLE = "large_pipeline"
CONCURRENCIES = (1, 8)
# The goals for co-location: p50 at most half of split's, throughput at least 2x.
GOAL_P50_RATIO = 2.0         # split_p50 / colocated_p50 >= 2
GOAL_THROUGHPUT_RATIO = 2.0  # colocated / split throughput >= 2

ECHO_ELEMENTS = 1_000_000    # 4 MB of FP32, as bench.replica's echo cell
SHM_REGION_BYTES = 16 << 20  # input + output (4 MB each) with room to spare
DEFAULT_CALLS = 200          # per side, split over the rounds
QUICK_CALLS = 20
CALL_TIMEOUT_S = 30.0
# The step math of examples/pipelines/large_tensor (its README): a check independent of the code.
SUM_PER_INPUT_SUM = 156_250.0
INTERMEDIATE_LENGTH = 1_000_000


# -- the ensemble -----------------------------------------------------------------------------

def read_config(repository: Path, model: str) -> mc.ModelConfig:
    return text_format.Parse((repository / model / "config.pbtxt").read_text(), mc.ModelConfig())


def describe_ensemble(repository: Path, name: str) -> dict:
    """Steps, the intermediate tensor between the first and last step, and its size."""
    config = read_config(repository, name)
    if config.platform != "ensemble":
        raise SystemExit(f"{name} in {repository} is not an ensemble (platform {config.platform!r})")
    steps = [step.model_name for step in config.ensemble_scheduling.step]
    if len(steps) < 2:
        raise SystemExit(f"{name}: a data-locality run needs two steps, it has {steps}")
    first, last = config.ensemble_scheduling.step[0], config.ensemble_scheduling.step[-1]
    produced = {value: key for key, value in first.output_map.items()}   # ensemble tensor -> step output
    consumed = [value for value in last.input_map.values() if value in produced]
    if not consumed:
        raise SystemExit(f"{name}: the last step reads nothing the first step writes")
    intermediate = consumed[0]
    step_output = produced[intermediate]
    first_config = read_config(repository, first.model_name)
    declared = next(output for output in first_config.output if output.name == step_output)
    itemsize = tensors.NUMPY_DTYPES[mc.DataType.Name(declared.data_type)[len("TYPE_"):]].itemsize
    return {
        "steps": steps,
        "first_step": first.model_name,
        "remote_step": last.model_name,
        "intermediate": intermediate,
        "intermediate_MB": math.prod(declared.dims) * itemsize / 1e6,
        "config": config,
    }


def ensemble_request(config: mc.ModelConfig) -> pb.ModelInferRequest:
    """Inputs as the ensemble declares them (name, datatype, dims): 0, 1, 2, ... in each."""
    inputs = {}
    for declared in config.input:
        if any(dim < 0 for dim in declared.dims):
            raise SystemExit(f"{config.name}: input {declared.name} has a variable dim {list(declared.dims)}")
        dtype = tensors.NUMPY_DTYPES[mc.DataType.Name(declared.data_type)[len("TYPE_"):]]
        count = math.prod(declared.dims)
        inputs[declared.name] = np.arange(count).astype(dtype).reshape(list(declared.dims))
    return infer_request(config.name, inputs, [output.name for output in config.output])


def check_summary(request: pb.ModelInferRequest, response: pb.ModelInferResponse) -> None:
    """SUMMARY is [sum, mean] of expand's intermediate: 156250 * sum(INPUT), sum / 1e6."""
    sent = request.inputs[0]
    x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(list(sent.shape))
    total = SUM_PER_INPUT_SUM * float(x.astype(np.float64).sum())
    expected = np.array([total, total / INTERMEDIATE_LENGTH], dtype=np.float32)
    outputs = output_arrays(response)
    assert "SUMMARY" in outputs, f"outputs {sorted(outputs)}"
    got = outputs["SUMMARY"].reshape(-1)
    assert np.allclose(got, expected, rtol=1e-6), f"SUMMARY {got.tolist()}, expected {expected.tolist()}"


def success_count(address: str, model: str) -> int:
    with InferenceClient(address, timeout=CALL_TIMEOUT_S) as client:
        stats = client.model_statistics(model)
    return sum(entry.inference_stats.success.count for entry in stats.model_stats)


# -- loads and lines --------------------------------------------------------------------------



def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 2)


def describe(label: str, figures: dict, unit: str = "infer/s") -> str:
    line = (f"  {label:<30} {figures['throughput']:>9.1f} {unit}   p50 {figures['p50_ms']} ms"
            f"   p99 {figures['p99_ms']} ms   errors {figures['errors']}")
    if figures.get("first_error"):
        line += f"\n    first error: {figures['first_error']}"
    return line


# -- section 1: data locality -----------------------------------------------------------------

def bench_data_locality(args) -> dict:
    ensemble = describe_ensemble(PIPELINE_REPOSITORY, ENSEMBLE)
    request = ensemble_request(ensemble["config"])
    remote = ensemble["remote_step"]
    print(f"data locality: {ENSEMBLE} ({' -> '.join(ensemble['steps'])}), intermediate "
          f"'{ensemble['intermediate']}' {ensemble['intermediate_MB']:g} MB; split = '{remote}' "
          "in its own runtime", flush=True)
    cells = {}
    with contextlib.ExitStack() as stack:
        colocated = stack.enter_context(RuntimeServer(
            PIPELINE_REPOSITORY, "--model", ENSEMBLE, name="colocated"))
        remote_server = stack.enter_context(RuntimeServer(
            PIPELINE_REPOSITORY, "--model", remote, name=f"split {remote}"))
        front = stack.enter_context(RuntimeServer(
            PIPELINE_REPOSITORY, "--model", ENSEMBLE, "--remote-model", f"{remote}={remote_server.address}",
            name="split front"))
        sides = {"colocated": colocated.address, "split": front.address}
        # The check call of each cell runs before timing; on the split side it must reach the other process.
        before = success_count(remote_server.address, remote)
        for concurrency in CONCURRENCIES:
            got = alternate(sides, request, check_summary, concurrency, args)
            if concurrency == CONCURRENCIES[0]:
                crossed = success_count(remote_server.address, remote) - before
                if crossed <= 0:
                    raise SystemExit(f"split: the '{remote}' replica served no call; the step did not cross")
            cell = {name: result.to_dict() for name, result in got.items()}
            cell["split_p50/colocated_p50"] = _ratio(cell["split"]["p50_ms"], cell["colocated"]["p50_ms"])
            cell["colocated/split_throughput"] = _ratio(cell["colocated"]["throughput"],
                                                        cell["split"]["throughput"])
            cells[f"c{concurrency}"] = cell
            for name in sides:
                print(describe(f"{ENSEMBLE} c={concurrency} {name}", cell[name]), flush=True)
            print(f"  -> split p50 / co-located p50: {cell['split_p50/colocated_p50']}x   "
                  f"co-located / split throughput: {cell['colocated/split_throughput']}x", flush=True)
        remote_calls = success_count(remote_server.address, remote) - before

    def goal(key: str, target: float) -> dict:
        values = {name: cell[key] for name, cell in cells.items()}
        return {"target": target, **values,
                "met": all(value is not None and value >= target for value in values.values())}

    goals = {
        "p50_split_over_colocated": goal("split_p50/colocated_p50", GOAL_P50_RATIO),
        "throughput_colocated_over_split": goal("colocated/split_throughput", GOAL_THROUGHPUT_RATIO),
    }
    for name, figures in goals.items():
        shown = ", ".join(f"{key} {value}x" for key, value in figures.items() if key.startswith("c"))
        print(f"  goal {name} >= {figures['target']:g}x: {shown} -> "
              f"{'met' if figures['met'] else 'NOT met'}", flush=True)
    return {
        "ensemble": ENSEMBLE,
        "steps": ensemble["steps"],
        "remote_step": remote,
        "intermediate": ensemble["intermediate"],
        "intermediate_MB": ensemble["intermediate_MB"],
        "remote_step_calls": remote_calls,
        "cells": cells,
        "goals": goals,
        "errors": sum(cell[side]["errors"] for cell in cells.values() for side in sides),
    }


# -- section 2: shared memory vs gRPC ---------------------------------------------------------

class Calls:
    """Latencies and errors of a bounded run of synchronous calls, pooled over rounds."""

    def __init__(self):
        self.latencies_s: list[float] = []
        self.elapsed_s = 0.0
        self.errors = 0
        self.first_error: str | None = None

    def run(self, call, count: int) -> None:
        started = time.perf_counter()
        for _ in range(count):
            begun = time.perf_counter()
            try:
                call()
            except Exception as error:  # counted, like the load generator's failed RPCs
                self.errors += 1
                self.first_error = self.first_error or f"{type(error).__name__}: {error}"[:300]
                continue
            self.latencies_s.append(time.perf_counter() - begun)
        self.elapsed_s += time.perf_counter() - started

    def to_dict(self) -> dict:
        ordered = sorted(self.latencies_s)

        def ms(p: float) -> float | None:
            if not ordered:
                return None
            return round(ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1] * 1e3, 3)

        out = {
            "throughput": round(len(ordered) / self.elapsed_s, 1) if self.elapsed_s > 0 else 0.0,
            "p50_ms": ms(50),
            "p99_ms": ms(99),
            "calls": len(ordered),
            "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 3),
        }
        if self.first_error:
            out["first_error"] = self.first_error
        return out


def bench_shared_memory(workdir: Path, args) -> dict:
    repository = workloads.make_repository(workloads.BENCH_MODELS / "echo_fp32", workdir)
    x = np.random.default_rng(20261122).random(ECHO_ELEMENTS, dtype=np.float32)
    megabytes = x.nbytes / 1e6
    per_round = max(1, args.calls // args.rounds)
    print(f"shared memory vs gRPC: echo_fp32, {megabytes:g} MB in and out, "
          f"{per_round * args.rounds} calls each in {args.rounds} round(s), one client", flush=True)
    with RuntimeServer(repository, name="echo_fp32") as server, \
            InferenceClient(server.address, timeout=CALL_TIMEOUT_S, retries=0) as client, \
            SharedMemory(client, SHM_REGION_BYTES) as shm:

        def via_shm():
            return shm.infer("echo_fp32", {"INPUT0": x}, outputs=["OUTPUT0"], timeout=CALL_TIMEOUT_S)

        def via_grpc():
            return client.infer("echo_fp32", {"INPUT0": x}, outputs=["OUTPUT0"])

        calls = {"shared_memory": via_shm, "grpc": via_grpc}
        for name, call in calls.items():  # one answer of each checked before timing
            got = call()["OUTPUT0"]
            if got.shape != x.shape or not np.array_equal(got, x):
                raise SystemExit(f"{name}: echo_fp32 answered a different tensor")
            del got  # a shared-memory output is a view the next call overwrites
        warmup = max(1, per_round // 10)
        results = {name: Calls() for name in calls}
        names = list(calls)
        for round_index in range(args.rounds):
            for name in names if round_index % 2 == 0 else names[::-1]:
                for _ in range(warmup):
                    calls[name]()
                results[name].run(calls[name], per_round)
    figures = {name: result.to_dict() for name, result in results.items()}
    for name, result in figures.items():
        print(describe(f"echo_fp32 {megabytes:g} MB {name}", result, "calls/s"), flush=True)
    ratio = _ratio(figures["shared_memory"]["throughput"], figures["grpc"]["throughput"])
    print(f"  -> shared memory / gRPC calls per second: {ratio}x", flush=True)
    return {
        "model": "echo_fp32",
        "tensor_MB": megabytes,
        "calls_per_side": per_round * args.rounds,
        "shared_memory": figures["shared_memory"],
        "grpc": figures["grpc"],
        "ratio_shm_over_grpc": ratio,
        "errors": sum(result["errors"] for result in figures.values()),
    }


# -- main -------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cell_arguments(parser, "alternating slices per co-located/split cell and shm/gRPC (default 2)")
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS,
                        help=f"4 MB echo calls per side for shared memory vs gRPC (default {DEFAULT_CALLS})")
    args = settle_cell_arguments(parser.parse_args(argv))
    if args.quick:
        args.calls = min(args.calls, QUICK_CALLS)
    args.calls = max(1, args.calls)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    started = time.monotonic()
    print(f"bench.pipeline: {args.duration:g} s per cell in {args.rounds} round(s), "
          f"{os.cpu_count()} CPUs, load generator on the same machine", flush=True)
    locality = bench_data_locality(args)
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-") as tmp:
        shm = bench_shared_memory(Path(tmp), args)
    summary = {
        "benchmark": "pipeline",
        "duration_s_per_cell": args.duration,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "data_locality": locality,
        "shared_memory": shm,
        "ratios": {
            **{f"split_p50/colocated_p50_{name}": cell["split_p50/colocated_p50"]
               for name, cell in locality["cells"].items()},
            **{f"colocated/split_throughput_{name}": cell["colocated/split_throughput"]
               for name, cell in locality["cells"].items()},
            "shm/grpc_calls_per_s": shm["ratio_shm_over_grpc"],
        },
        "errors": locality["errors"] + shm["errors"],
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench.pipeline: interrupted; every server it started is stopped", file=sys.stderr)
        sys.exit(130)
