"""A replica's memory stays bounded under requests that are refused or never read.

Each test runs a real ``python -m meshserve.runtime`` and reads its resident memory
(VmRSS in /proc/PID/status) while a real gRPC client misbehaves. The bounds
are in units of the message size, far under what the failures cost before:
a refused request was kept alive by reference cycles until the cyclic
garbage collector ran, so N of them held about N times their size; a stream
that was never read queued every request it was sent.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from test_runtime_helpers import EXAMPLES, RPC_TIMEOUT_S, decode_outputs, infer_request, open_stub, wait_until

from meshserve.protos.inference import grpc_service_pb2 as pb

MIB = 1 << 20
# Refused requests: modest, well within the server's 256 MiB message limit.
OVERSIZE_BYTES = 64 * MIB
OVERSIZE_CALLS = 4  # before the fix the first call already left twice its size
# What may stay resident once a refused request is gone: less than the request itself (the
# replica's heap trimmer returns what the allocator kept, runtime/heap_trim.py). Before the
# fix each call left more than twice its size, held by reference cycles until gc ran.
REFUSED_RSS_BOUND = OVERSIZE_BYTES

# A stream that writes and never reads: 600 x 1 MiB, the failing case of the issue.
STREAM_MESSAGE_BYTES = 1 * MIB
STREAM_WRITES = 600
# A write that waits this long is held back by flow control: the server stopped reading
# (a busy shared machine can pause a server that reads everything for a second).
WRITE_STALL_S = 2.0
# The server may hold a stream's in-flight requests and queued responses (64 + 16, see
# runtime/servicer.py), each a few copies of the message; before the fix it held all 600.
STREAM_RSS_BOUND = 400 * MIB
# Once the stream is cancelled nothing of it is kept (before the fix: all of it, 1 GiB).
ENDED_STREAM_RSS_BOUND = 64 * MIB


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.fixture
def add_sub_runtime(start_runtime):
    return start_runtime("--model-repository", EXAMPLES, "--model", "add_sub")


@pytest.fixture
def echo_runtime(start_runtime):
    return start_runtime("--model-repository", EXAMPLES, "--model", "echo_bytes")


def _wrong_size_add_sub(size: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(bytes(size))  # shape [1, 16] of FP32 needs 64 bytes
    request.raw_input_contents.append(bytes(64))
    return request


def _refused_unary(channel: grpc.Channel, request: bytes) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(request, timeout=RPC_TIMEOUT_S)
    return info.value.code(), info.value.details()


def _refused_in_stream(channel: grpc.Channel, request: bytes) -> tuple[grpc.StatusCode, str]:
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                   response_deserializer=pb.ModelStreamInferResponse.FromString)
    (response,) = list(stream(iter([request]), timeout=RPC_TIMEOUT_S))
    code, _, message = response.error_message.partition(": ")
    return grpc.StatusCode[code], message


@pytest.mark.parametrize("send", [_refused_unary, _refused_in_stream], ids=["ModelInfer", "ModelStreamInfer"])
def test_refused_oversize_requests_leave_no_memory_behind(add_sub_runtime, send):
    pid = add_sub_runtime.proc.pid
    channel = grpc.insecure_channel(add_sub_runtime.address,
                                    options=[("grpc.max_send_message_length", 2 * OVERSIZE_BYTES)])
    try:
        request = _wrong_size_add_sub(OVERSIZE_BYTES).SerializeToString()
        baseline = resident_bytes(pid)
        for call in range(OVERSIZE_CALLS):
            code, message = send(channel, request)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "'INPUT0'" in message, (code, message)
            wait_until(lambda: resident_bytes(pid) - baseline <= REFUSED_RSS_BOUND,
                       f"the replica back within {REFUSED_RSS_BOUND // MIB} MiB of its "
                       f"{baseline // MIB} MiB after refused call {call + 1}")
    finally:
        channel.close()


def _echo_request(size: int) -> bytes:
    request = pb.ModelInferRequest(model_name="echo_bytes")
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(size.to_bytes(4, "little") + bytes(size))
    return request.SerializeToString()


async def _write_and_never_read(address: str, pid: int) -> tuple[int, int]:
    """Writes until flow control holds the writes back; returns (writes done, peak RSS)."""
    message = _echo_request(STREAM_MESSAGE_BYTES)
    peak = resident_bytes(pid)
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")(timeout=RPC_TIMEOUT_S)
        written = 0
        try:
            for _ in range(STREAM_WRITES):
                await asyncio.wait_for(call.write(message), WRITE_STALL_S)
                written += 1
                peak = max(peak, resident_bytes(pid))
        except TimeoutError:
            pass  # held back: the server stopped reading this stream
        settle = time.monotonic() + WRITE_STALL_S  # what was accepted is being answered: watch it
        while time.monotonic() < settle:
            await asyncio.sleep(0.05)
            peak = max(peak, resident_bytes(pid))
        call.cancel()
    return written, peak


def test_a_stream_that_is_never_read_is_bounded_and_pushed_back(echo_runtime):
    pid = echo_runtime.proc.pid
    baseline = resident_bytes(pid)
    written, peak = asyncio.run(_write_and_never_read(echo_runtime.address, pid))
    assert written < STREAM_WRITES, "the server read every request of a stream nobody reads"
    assert peak - baseline <= STREAM_RSS_BOUND, f"grew {(peak - baseline) / MIB:.0f} MiB"
    wait_until(lambda: resident_bytes(pid) - baseline <= ENDED_STREAM_RSS_BOUND,
               f"the replica back within {ENDED_STREAM_RSS_BOUND // MIB} MiB of its {baseline // MIB} MiB "
               f"once the stream ended")

    channel, stub = open_stub(echo_runtime.address)
    try:  # the cancelled stream left the server serving
        items = np.array([b"still here"], dtype=object)
        response = stub.ModelInfer(infer_request("echo_bytes", {"INPUT0": items}, datatypes={"INPUT0": "BYTES"}),
                                   timeout=RPC_TIMEOUT_S)
        np.testing.assert_array_equal(decode_outputs(response)["OUTPUT0"], items)
    finally:
        channel.close()
