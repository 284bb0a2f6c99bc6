"""What mutual TLS costs through the proxy: the same path in plaintext and over mTLS, side by side.

    .venv/bin/python -m bench.tls [--duration 5] [--warmup 1] [--rounds 2] [--quick]

Two copies of one path run at once, each a runtime replica serving
``add_sub`` and ``echo_fp32`` and a proxy in front of it (``--routes-file``:
no scheduler), driven by the same load generator (bench/loadgen.py, one
channel, closed loop), taking turns within each cell (ABBA):

- ``plaintext``: no TLS anywhere (what loopback development uses);
- ``mtls``: certificates from ``scheduler ctl certs`` (ECDSA P-256), the
  client, the proxy and the replica each with its own, every server with
  ``--tls-require-client-cert``: client -> proxy and proxy -> replica are
  both mutual TLS.

Cells: ``tiny`` (add_sub, two FP32 [1, 16]) and ``64KB`` (echo_fp32, 16,384
FP32 each way) at concurrency 1 and 16. Connections are opened once per
slice, so the figures are the steady-state cost of encryption, not of
handshakes. Goal: mtls/plaintext throughput >= 0.8 in every cell; the p50
that mTLS adds is printed too (steadier than throughput on a busy machine).
Human lines first; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grpc
from google.protobuf import text_format

from bench import workloads
from bench.cli import add_cell_arguments, settle_cell_arguments
from bench.loadgen import LoadResult, measure
from bench.proxy import ListeningProcess, added_p50, describe, ratio, route_table
from bench.servers import RuntimeServer, stop_on_signals
from meshserve.common.security.tls import TlsConfig, as_flags
from meshserve.scheduler.certs import create_ca, issue_certificate

CONCURRENCIES = (1, 16)
PATHS = ("plaintext", "mtls")
GOAL_RATIO = 0.8


def sizes():
    return {
        "tiny": ("add_sub, 2 x FP32 [1, 16] in and out", workloads.add_sub_request(), workloads.check_add_sub),
        "64KB": ("echo_fp32, 16,384 FP32 (65,536 B) each way",
                 workloads.echo_request("echo_fp32", (16_384,)), workloads.check_echo),
    }


def make_pki(folder: Path) -> dict[str, TlsConfig]:
    """The CA and one certificate per party; each party's settings, requiring client certificates."""
    create_ca(folder)
    ca = str(folder / "ca.pem")
    configs = {}
    for name, role in (("replica", "agent"), ("proxy-1", "proxy"), ("bench-client", "client")):
        files = issue_certificate(folder, name, role)
        configs[role] = TlsConfig(cert=str(files.cert), key=str(files.key), ca=ca, require_client_cert=True)
    return configs


def start_path(name: str, repository: Path, workdir: Path, stack: contextlib.ExitStack,
               tls: dict[str, TlsConfig] | None) -> str:
    """A replica and a proxy in front of it; the proxy's address."""
    replica = stack.enter_context(RuntimeServer(repository, *(as_flags(tls["agent"]) if tls else []),
                                                name=f"{name} replica"))
    routes = workdir / f"{name}-routes.pbtxt"
    routes.write_text(text_format.MessageToString(route_table({"add_sub": replica.address,
                                                               "echo_fp32": replica.address})))
    proxy = stack.enter_context(ListeningProcess(
        [sys.executable, "-m", "meshserve.proxy", "--routes-file", str(routes), "--listen", "127.0.0.1:0",
         *(as_flags(tls["proxy"]) if tls else [])], name=f"{name} proxy"))
    print(f"{name}: proxy {proxy.address} -> replica {replica.address}", flush=True)
    return proxy.address


def run_cell(addresses: dict[str, str], credentials: dict[str, grpc.ChannelCredentials | None], request, checker,
             concurrency: int, args) -> dict[str, LoadResult]:
    slices: dict[str, list[LoadResult]] = {name: [] for name in addresses}
    names = list(addresses)
    for round_index in range(args.rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            slices[name].append(asyncio.run(measure(
                addresses[name], request, concurrency=concurrency, checker=checker, credentials=credentials[name],
                duration_s=args.duration / args.rounds, warmup_s=args.warmup)))
    return {name: LoadResult.merge(got) for name, got in slices.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cell_arguments(parser, "alternating slices per cell, the two paths taking turns (default 2)")
    args = settle_cell_arguments(parser.parse_args(sys.argv[1:] if argv is None else argv))
    stop_on_signals()
    started = time.monotonic()
    print(f"bench.tls: {args.duration:g} s per cell in {args.rounds} round(s), {os.cpu_count()} CPUs, "
          f"load generator on the same machine", flush=True)
    cells: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-tls-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        repository = workloads.make_repository(workloads.EXAMPLE_MODELS / "add_sub", workdir)
        shutil.copytree(workloads.BENCH_MODELS / "echo_fp32", repository / "echo_fp32",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        pki = make_pki(workdir / "pki")
        addresses = {"plaintext": start_path("plaintext", repository, workdir, stack, None),
                     "mtls": start_path("mtls", repository, workdir, stack, pki)}
        credentials = {"plaintext": None, "mtls": pki["client"].channel_credentials()}
        for size, (what, request, checker) in sizes().items():
            print(f"{size} ({what}):", flush=True)
            cells[size] = {}
            for concurrency in CONCURRENCIES:
                got = run_cell(addresses, credentials, request, checker, concurrency, args)
                cell: dict = {name: result.to_dict() for name, result in got.items()}
                cell["mtls/plaintext"] = ratio(got["mtls"], got["plaintext"])
                cell["mtls_added_p50_ms"] = added_p50(got["mtls"], got["plaintext"])
                cells[size][f"c{concurrency}"] = cell
                print(f" c={concurrency}:", flush=True)
                for name in PATHS:
                    print(describe(name, got[name]).replace(f"  {name:<7}", f"  {name:<9}"), flush=True)
                print(f"  -> throughput mtls/plaintext {cell['mtls/plaintext']}x; p50 added by mTLS "
                      f"{cell['mtls_added_p50_ms']} ms", flush=True)
    ratios = {f"{size}_c{c}": cells[size][f"c{c}"]["mtls/plaintext"] for size in cells for c in CONCURRENCIES}
    met = all(value is not None and value >= GOAL_RATIO for value in ratios.values())
    print(f"goal: mtls/plaintext throughput >= {GOAL_RATIO} through the proxy in every cell: "
          f"{'MET' if met else 'NOT MET'}   {ratios}", flush=True)
    print(json.dumps({
        "benchmark": "tls", "duration_s_per_cell": args.duration, "warmup_s": args.warmup, "rounds": args.rounds,
        "cpus": os.cpu_count(), "cells": cells, "ratios": ratios,
        "goal": {"target": f"mtls/plaintext >= {GOAL_RATIO}", "met": met},
        "wall_s": round(time.monotonic() - started, 1),
    }), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench.tls: interrupted; every server it started is stopped", file=sys.stderr)
        sys.exit(130)
