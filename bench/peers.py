"""meshserve vs Triton vs MLServer on add_sub, side by side in one run.

    .venv/bin/python -m bench.peers --peers-dir DIR [--install-dir /tmp/meshserve-peers]
        [--duration 5] [--rounds 2] [--quick]

All three servers are up at once (idle ones cost next to nothing) and are
driven by the same load generator, ours (bench/loadgen.py), with the same
request: add_sub, INPUT0 and INPUT1 FP32 [1, 16], raw tensors, one channel.
Each concurrency's ``--duration`` is split into ``--rounds`` slices and the
systems take turns in a rotating order, so drift on the shared 2-core machine
is spread over all of them. Servers, each with dynamic batching:

- meshserve: ``python -m meshserve.runtime`` on a copy of examples/models/add_sub
  (max_batch_size 64, 500 us queue delay);
- Triton: ``start_triton.sh PORT models_dynbatch`` (Python backend,
  max_batch_size 16, 1000 us);
- MLServer: ``start_mlserver.sh PORT models_batch`` (adaptive batching,
  max_batch_size 16, 2 ms).

The peers and their scripts are outside tooling, not part of meshserve (see
the peers folder's README), so ``--peers-dir`` is required: no default could
point at them without leaving the repository. A peer whose script or install
is missing is skipped with a message.
Human lines first; the last line is one JSON object with every figure and
the throughput ratios meshserve/Triton and meshserve/MLServer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import workloads
from bench.cli import add_cell_arguments, settle_cell_arguments
from bench.loadgen import CheckFailed, LoadResult, measure
from bench.servers import REPO_ROOT, PeerServer, RuntimeServer, stop_on_signals

CONCURRENCIES = (1, 16)
DEFAULT_INSTALL_DIR = os.environ.get("PEERS_DIR", "/tmp/meshserve-peers")


def available_systems(args, workdir: Path) -> tuple[dict, dict[str, str]]:
    """name -> zero-argument server factory, and name -> why it is skipped."""
    systems, skipped = {}, {}
    if (REPO_ROOT / "runtime" / "__main__.py").is_file():
        repository = workloads.make_repository(workloads.EXAMPLE_MODELS / "add_sub", workdir)
        systems["meshserve"] = lambda: RuntimeServer(repository, name="meshserve")
    else:
        skipped["meshserve"] = f"{REPO_ROOT / 'runtime' / '__main__.py'} does not exist yet"
    peers = Path(args.peers_dir).resolve()
    install = Path(args.install_dir)
    for name, script, repo, venv in (
        ("triton", "start_triton.sh", "models_dynbatch", "venv-triton"),
        ("mlserver", "start_mlserver.sh", "models_batch", "venv-mlserver"),
    ):
        if not os.access(peers / script, os.X_OK):
            skipped[name] = f"no executable {peers / script} (check --peers-dir)"
        elif not (install / venv).is_dir():
            skipped[name] = f"no {install / venv}: run {peers / 'setup.sh'} (or pass --install-dir)"
        else:
            systems[name] = (lambda name=name, script=script, repo=repo: PeerServer(
                name, peers / script, repo, peers_dir=str(install)))
    return systems, skipped


def ratio(ours: LoadResult | None, theirs: LoadResult | None) -> float | None:
    if ours is None or theirs is None or theirs.throughput <= 0:
        return None
    return round(ours.throughput / theirs.throughput, 2)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cell_arguments(parser, "alternating slices, the systems taking turns (default 2)")
    parser.add_argument("--peers-dir", required=True,
                        help="the peers folder holding start_triton.sh and start_mlserver.sh (outside tooling, "
                             "not part of meshserve)")
    parser.add_argument("--install-dir", default=DEFAULT_INSTALL_DIR,
                        help="where setup.sh installed the peers (PEERS_DIR; default /tmp/meshserve-peers)")
    return settle_cell_arguments(parser.parse_args(argv))


def main(argv=None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    started = time.monotonic()
    request, checker = workloads.add_sub_request(), workloads.check_add_sub
    results: dict[str, dict[str, LoadResult]] = {}
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-") as tmp, contextlib.ExitStack() as servers:
        factories, skipped = available_systems(args, Path(tmp))
        addresses = {}
        for name, factory in factories.items():
            try:
                server = factory()
                servers.enter_context(server)  # started here, stopped when the stack closes
                addresses[name] = server.address
                print(f"{name}: serving add_sub on {server.address}", flush=True)
            except Exception as error:  # one peer failing to start must not stop the others
                skipped[name] = f"did not start: {error}"
        for name, why in skipped.items():
            print(f"{name}: SKIPPED: {why}", flush=True)
        names = list(addresses)
        print(f"add_sub, {args.duration:g} s per cell in {args.rounds} round(s), systems take turns: "
              f"{', '.join(names) or 'none'}", flush=True)
        for concurrency in CONCURRENCIES:
            slices: dict[str, list[LoadResult]] = {name: [] for name in names}
            for round_index in range(args.rounds):
                shift = round_index % max(1, len(names))
                for name in names[shift:] + names[:shift]:
                    if name in skipped:
                        continue
                    try:
                        slices[name].append(asyncio.run(measure(
                            addresses[name], request, concurrency=concurrency, checker=checker,
                            duration_s=args.duration / args.rounds, warmup_s=args.warmup)))
                    except CheckFailed as error:
                        skipped[name] = str(error)
                        print(f"{name}: DROPPED: {error}", flush=True)
            results[f"c{concurrency}"] = {name: LoadResult.merge(got) for name, got in slices.items()
                                          if got and name not in skipped}
            for name, result in results[f"c{concurrency}"].items():
                figures = result.to_dict()
                print(f"  c={concurrency:<3} {name:<10} {figures['throughput']:>9.1f} infer/s"
                      f"   p50 {figures['p50_ms']} ms   p99 {figures['p99_ms']} ms"
                      f"   errors {figures['errors']}", flush=True)
    ratios = {}
    for cell, got in results.items():
        ours = got.get("meshserve")
        ratios[cell] = {f"meshserve/{peer}": ratio(ours, got.get(peer)) for peer in ("triton", "mlserver")}
        shown = {key: "n/a" if value is None else f"{value}x" for key, value in ratios[cell].items()}
        print(f"  {cell}: throughput meshserve/Triton {shown['meshserve/triton']}, "
              f"meshserve/MLServer {shown['meshserve/mlserver']}", flush=True)
    summary = {
        "benchmark": "peers",
        "model": "add_sub",
        "duration_s_per_cell": args.duration,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "cells": {cell: {name: result.to_dict() for name, result in got.items()}
                  for cell, got in results.items()},
        "ratios": ratios,
        "skipped": skipped,
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench.peers: interrupted; every server it started is stopped", file=sys.stderr)
        sys.exit(130)
