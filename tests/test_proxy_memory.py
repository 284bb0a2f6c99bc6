"""Refused large requests do not stay in the proxy's memory (issue 8, item 5a).

Fifteen 250 MB wrong-size requests through the proxy grew it to 2.9 GB: each
refused call's request bytes were held by frames in a reference cycle
(grpc.aio's failed call and aborted server call keep their exception, whose
traceback holds the frames), freed only whenever the garbage collector ran.
"""

from __future__ import annotations

import gc
import subprocess
import sys

import grpc
import numpy as np
import pytest
from conftest import EXAMPLES, REPO_ROOT, RuntimeProcess, wait_for_line
from test_proxy_helpers import RPC_TIMEOUT_S, LoopThread, ProxyRig, route
from test_runtime_helpers import assert_status

from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc

MiB = 1024 * 1024
# Above glibc's largest mmap threshold (32 MiB), so a freed request goes back to the system at once
# and RSS shows what is still held, not what the allocator keeps for reuse.
REQUEST_BYTES = 40 * MiB
CALLS = 8
# What a proxy may hold beyond its baseline after any of the calls: a request or two in flight plus
# allocator slack. Kept requests add a whole request per call (8 calls: 320 MiB).
GROWTH_BOUND = 4 * REQUEST_BYTES


def _wrong_size_request(model: str, size: int) -> pb.ModelInferRequest:
    """add_sub's INPUT0 declared [1, 16] FP32 (64 bytes) but ``size`` bytes sent."""
    tensor = pb.ModelInferRequest.InferInputTensor
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[tensor(name="INPUT0", datatype="FP32", shape=[1, 16]),
                tensor(name="INPUT1", datatype="FP32", shape=[1, 16])],
        raw_input_contents=[b"\0" * size, np.zeros(16, np.float32).tobytes()],
    )


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def replica():
    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(EXAMPLES), "--model", "add_sub"])
    yield process
    process.stop()


@pytest.fixture
def proxy_process(replica, tmp_path):
    routes = tmp_path / "routes.txtpb"
    routes.write_text(f'routes {{ model: "add_sub" deployment: "add_sub" revision: 1 weight: 1 '
                      f'endpoints {{ replica_id: "r0" address: "{replica.address}" node: "n" }} }}\n')
    proc = subprocess.Popen([sys.executable, "-m", "meshserve.proxy", "--routes-file", str(routes), "--listen", "127.0.0.1:0"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    match = wait_for_line(proc, r"listening on (\S+)")
    assert match, "the proxy did not start"
    yield proc, match.group(1)
    proc.terminate()
    proc.wait(20)


def test_proxy_rss_returns_to_baseline_after_each_large_refused_call(proxy_process):
    proc, address = proxy_process
    limits = [("grpc.max_send_message_length", 2 * REQUEST_BYTES)]
    with grpc.insecure_channel(address, options=limits) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ServerLive(pb.ServerLiveRequest(), timeout=RPC_TIMEOUT_S)
        baseline = _rss_bytes(proc.pid)
        request = _wrong_size_request("add_sub", REQUEST_BYTES)
        growth = []
        for _ in range(CALLS):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
            assert_status(info.value, grpc.StatusCode.INVALID_ARGUMENT, "INPUT0")
            growth.append(_rss_bytes(proc.pid) - baseline)
    print(f"proxy RSS growth after each refused {REQUEST_BYTES // MiB} MiB call (MiB):",
          [g // MiB for g in growth])
    assert max(growth) < GROWTH_BOUND, f"proxy RSS grew by {[g // MiB for g in growth]} MiB"


def _frames_holding_large_bytes(objects) -> list[str]:
    return [o.f_code.co_name for o in objects
            if type(o).__name__ == "frame" and "proxy" in o.f_code.co_filename
            and any(isinstance(v, bytes) and len(v) >= MiB for v in o.f_locals.values())]


@pytest.mark.parametrize("model", ["add_sub", "no_such_model"], ids=["refused-by-replica", "refused-by-proxy"])
def test_no_refused_request_is_left_in_a_reference_cycle(replica, model):
    loop = LoopThread()
    rig = ProxyRig(loop, route("add_sub", ("r0", replica.address)))
    channel = grpc.insecure_channel(rig.address)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = _wrong_size_request(model, 2 * MiB)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
        channel.close()
        rig.close()   # the server's side of the call is over: what it kept is garbage now, or freed
        gc.collect()
        kept = _frames_holding_large_bytes(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        loop.close()
    assert kept == [], f"frames of the proxy holding the request in a reference cycle: {kept}"
