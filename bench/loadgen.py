"""Closed-loop asyncio load generator for ``GRPCInferenceService/ModelInfer``.

C workers share one gRPC channel (or are spread over several): each sends a
request, awaits its answer, and sends the next, so the offered load is set by
C and the server's speed, never by a rate. Guarantees every benchmark here
relies on:

- When given a checker, one answer is verified before anything is timed; a
  wrong answer raises ``CheckFailed`` and nothing is measured.
- Warm-up and duration are clamped (``MAX_WARMUP_S``, ``MAX_DURATION_S``) and
  every call carries a deadline, so a cell always ends.
- A request counts when it *completed* inside the measured window (warm-up
  excluded), as in Triton's perf_analyzer; throughput is those requests over
  the window's length, so neither warm-up nor the calls still in flight at
  its end bias it. Those last calls are awaited, not cancelled, and not
  counted. Failed calls are counted apart and never enter the latencies.

Usage::

    with RuntimeServer(repository) as server:          # bench/servers.py, re-exported
        result = run_load(server.address, request, concurrency=16, duration_s=5)
    result["throughput"], result["p99_ms"]
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from bench.servers import PeerServer, RuntimeServer  # noqa: F401  (re-exported for benchmarks)
from meshserve.common import tensors
from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc

# A cell is meant to last a few seconds on a shared 2-core machine; these bound a typo.
MAX_DURATION_S = 60.0
MAX_WARMUP_S = 30.0
# One call: generous for a 4 MB tensor on a loaded machine, short enough that a hung
# server ends the cell instead of the benchmark.
CALL_DEADLINE_S = 30.0
# Above gRPC's 4 MiB default so that tensor-sized answers (and their framing) fit.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

RequestSource = pb.ModelInferRequest | Callable[[], pb.ModelInferRequest]
Checker = Callable[[pb.ModelInferRequest, pb.ModelInferResponse], None]


class CheckFailed(AssertionError):
    """The answer verified before timing was wrong (or the call failed)."""


@dataclass
class LoadResult:
    """What one cell measured; ``merge`` pools several rounds of the same cell."""

    concurrency: int
    duration_s: float
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    @property
    def throughput(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def percentile_ms(self, p: float) -> float | None:
        """Nearest-rank percentile of successful latencies, in milliseconds."""
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        rank = max(1, math.ceil(p / 100.0 * len(ordered)))
        return ordered[rank - 1] * 1e3

    def to_dict(self) -> dict:
        def ms(p: float) -> float | None:
            value = self.percentile_ms(p)
            return None if value is None else round(value, 3)

        out = {
            "throughput": round(self.throughput, 1),
            "p50_ms": ms(50),
            "p90_ms": ms(90),
            "p99_ms": ms(99),
            "requests": self.requests,
            "errors": self.errors,
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 3),
        }
        if self.first_error:
            out["first_error"] = self.first_error
        return out

    @classmethod
    def merge(cls, results: Sequence[LoadResult]) -> LoadResult:
        merged = cls(concurrency=results[0].concurrency, duration_s=0.0)
        for result in results:
            merged.duration_s += result.duration_s
            merged.latencies_s.extend(result.latencies_s)
            merged.errors += result.errors
            merged.first_error = merged.first_error or result.first_error
        return merged


def output_arrays(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The response's outputs as numpy arrays, from raw contents or typed contents."""
    arrays = {}
    for index, output in enumerate(response.outputs):
        if index < len(response.raw_output_contents):
            raw = response.raw_output_contents[index]
            arrays[output.name] = tensors.from_raw(output.datatype, list(output.shape), raw)
        else:
            arrays[output.name] = tensors.from_contents(
                output.datatype, list(output.shape), output.contents
            )
    return arrays


def infer_request(
    model_name: str,
    inputs: dict[str, np.ndarray],
    outputs: Sequence[str] = (),
) -> pb.ModelInferRequest:
    """A ModelInferRequest carrying ``inputs`` as raw_input_contents, in dict order."""
    request = pb.ModelInferRequest(model_name=model_name)
    for name, array in inputs.items():
        datatype = tensors.datatype_of(array)
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(tensors.to_raw(array, datatype))
    for name in outputs:
        request.outputs.add(name=name)
    return request


def open_channels(target: str, count: int,
                  credentials: grpc.ChannelCredentials | None = None) -> list[grpc.aio.Channel]:
    """``count`` channels to ``target``, each with its own connection (TLS with ``credentials``)."""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Without a local pool, channels with equal arguments share one connection.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if credentials is not None:
        return [grpc.aio.secure_channel(target, credentials, options=options) for _ in range(count)]
    return [grpc.aio.insecure_channel(target, options=options) for _ in range(count)]


async def measure(
    target: str,
    request: RequestSource,
    *,
    concurrency: int,
    duration_s: float = 5.0,
    warmup_s: float = 1.0,
    channels: int = 1,
    checker: Checker | None = None,
    metadata: Sequence[tuple[str, str]] | None = None,
    deadline_s: float = CALL_DEADLINE_S,
    credentials: grpc.ChannelCredentials | None = None,
) -> LoadResult:
    """Drive ``concurrency`` closed-loop workers against ``target``; see the module docstring."""
    if concurrency < 1 or channels < 1:
        raise ValueError("concurrency and channels must be at least 1")
    duration_s = min(max(duration_s, 0.1), MAX_DURATION_S)
    warmup_s = min(max(warmup_s, 0.0), MAX_WARMUP_S)
    make_request = request if callable(request) else (lambda: request)
    metadata = tuple(metadata) if metadata else None
    opened = open_channels(target, min(channels, concurrency), credentials)
    stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in opened]
    try:
        if checker is not None:
            await _check_once(stubs[0], make_request(), checker, metadata, deadline_s)
        result = LoadResult(concurrency=concurrency, duration_s=0.0)
        window_start = time.perf_counter() + warmup_s
        window_end = window_start + duration_s

        async def worker(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
            while True:
                started = time.perf_counter()
                if started >= window_end:
                    return
                try:
                    await stub.ModelInfer(make_request(), metadata=metadata, timeout=deadline_s)
                    failure = None
                except grpc.aio.AioRpcError as error:
                    failure = error
                done = time.perf_counter()
                if not window_start <= done < window_end:
                    continue
                if failure is None:
                    result.latencies_s.append(done - started)
                else:
                    result.errors += 1
                    result.first_error = result.first_error or _describe(failure)

        await asyncio.gather(*(worker(stubs[i % len(stubs)]) for i in range(concurrency)))
        result.duration_s = duration_s
        return result
    finally:
        await asyncio.gather(*(channel.close() for channel in opened))


def measure_cell(address, request, checker, concurrency, duration_s, warmup_s) -> LoadResult:
    """One closed-loop cell, run to completion on its own event loop."""
    return asyncio.run(measure(address, request, concurrency=concurrency, duration_s=duration_s,
                               warmup_s=warmup_s, checker=checker))


def alternate(sides: dict[str, str], request, checker, concurrency, args) -> dict[str, LoadResult]:
    """Measure each side (name -> address) in ``args.rounds`` alternating slices; pool them."""
    slices: dict[str, list[LoadResult]] = {name: [] for name in sides}
    names = list(sides)
    for round_index in range(args.rounds):
        order = names if round_index % 2 == 0 else names[::-1]  # ABBA: neither side always first
        for name in order:
            slices[name].append(measure_cell(sides[name], request, checker, concurrency,
                                             args.duration / args.rounds, args.warmup))
    return {name: LoadResult.merge(results) for name, results in slices.items()}


def run_load(target: str, request: RequestSource, **options) -> dict:
    """Synchronous wrapper of ``measure``: the cell's figures as a dict."""
    return asyncio.run(measure(target, request, **options)).to_dict()


async def _check_once(stub, request, checker, metadata, deadline_s) -> None:
    try:
        response = await stub.ModelInfer(request, metadata=metadata, timeout=deadline_s)
    except grpc.aio.AioRpcError as error:
        raise CheckFailed(f"checked call failed: {_describe(error)}") from error
    try:
        checker(request, response)
    except AssertionError as error:
        raise CheckFailed(f"wrong answer from {request.model_name}: {error}") from error


def _describe(error: grpc.aio.AioRpcError) -> str:
    return f"{error.code().name}: {error.details()}"[:300]
