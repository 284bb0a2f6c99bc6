"""Through the proxy, nothing that belongs to one host: shared memory and model control.

A real runtime (``--model-control explicit``: it would load and unload if
asked directly) behind an in-process proxy with a static table.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import EXAMPLES, RuntimeProcess
from test_proxy_helpers import LoopThread, ProxyRig, route
from test_runtime_helpers import RPC_TIMEOUT_S, assert_status, check_add_sub, open_stub, rpc_error

from meshserve.clients import SharedMemoryRegion
from meshserve.protos.inference import grpc_service_pb2 as pb


@pytest.fixture(scope="module")
def replica():
    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(EXAMPLES),
                              "--model", "add_sub", "--model-control", "explicit"])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def proxy(replica):
    loop = LoopThread()
    rig = ProxyRig(loop, route("add_sub", ("r0", replica.address)))
    channel, stub = open_stub(rig.address)
    yield stub
    channel.close()
    rig.close()
    loop.close()


def _region_request(kind: str, region: str = "someone_elses") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add_sub", id="shm-1")
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=[2, 16])
        if kind == "input" and name == "INPUT0":
            tensor.parameters["shared_memory_region"].string_param = region
            tensor.parameters["shared_memory_byte_size"].int64_param = 128
        else:
            request.raw_input_contents.append(np.ones((2, 16), np.float32).tobytes())
    if kind == "output":
        output = request.outputs.add(name="OUTPUT0")
        output.parameters["shared_memory_region"].string_param = region
        output.parameters["shared_memory_byte_size"].int64_param = 128
    return request


@pytest.mark.parametrize("method, request_", [
    ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="add_sub")),
    ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="add_sub")),
])
def test_model_load_and_unload_are_refused_through_the_proxy(proxy, replica, method, request_):
    error = rpc_error(getattr(proxy, method), request_)
    assert_status(error, grpc.StatusCode.FAILED_PRECONDITION, method, "proxy", "scheduler")
    check_add_sub(proxy)   # still served: nothing reached the replica


@pytest.mark.parametrize("method, request_", [
    ("SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(name="r", key="/r", byte_size=64)),
    ("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest()),
    ("SystemSharedMemoryUnregister", pb.SystemSharedMemoryUnregisterRequest()),
    ("CudaSharedMemoryRegister", pb.CudaSharedMemoryRegisterRequest(name="r", byte_size=64)),
])
def test_shared_memory_registration_is_refused_through_the_proxy(proxy, method, request_):
    error = rpc_error(getattr(proxy, method), request_)
    assert_status(error, grpc.StatusCode.FAILED_PRECONDITION, method, "local to a host")


@pytest.mark.parametrize("kind", ["input", "output"])
def test_a_request_naming_a_shared_memory_region_is_refused_at_the_proxy(proxy, replica, kind):
    with SharedMemoryRegion(128) as region:
        # Registered on the replica by a local client: the proxy must still not let anyone name it.
        channel, direct = open_stub(replica.address)
        try:
            direct.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name="someone_elses", key=region.key, byte_size=128), timeout=RPC_TIMEOUT_S)
            before = direct.ModelStatistics(pb.ModelStatisticsRequest(name="add_sub"), timeout=RPC_TIMEOUT_S)
            error = rpc_error(proxy.ModelInfer, _region_request(kind))
            assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, f"{kind} '", "shared memory", "proxy")
            responses = list(proxy.ModelStreamInfer(iter([_region_request(kind)]), timeout=RPC_TIMEOUT_S))
            assert [r.error_message.split(":")[0] for r in responses] == ["INVALID_ARGUMENT"]
            assert "shared memory" in responses[0].error_message
            after = direct.ModelStatistics(pb.ModelStatisticsRequest(name="add_sub"), timeout=RPC_TIMEOUT_S)
            assert after.model_stats[0].inference_count == before.model_stats[0].inference_count  # never forwarded
        finally:
            direct.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=RPC_TIMEOUT_S)
            channel.close()


def test_a_tensor_merely_named_like_the_parameter_is_forwarded(proxy):
    request = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[2, 16])
        request.raw_input_contents.append(np.ones((2, 16), np.float32).tobytes())
    request.outputs.add(name="OUTPUT0").parameters["note"].string_param = "shared_memory_region"
    response = proxy.ModelInfer(request, timeout=RPC_TIMEOUT_S)
    assert response.outputs[0].name == "OUTPUT0"


@pytest.mark.parametrize("elements", [16, 1 << 16])     # below and above the whole-buffer search
def test_the_scan_finds_the_parameter_in_any_tensor_and_only_there(elements):
    from meshserve.proxy.wire import may_name_shared_memory

    def request(where: str) -> bytes:
        r = pb.ModelInferRequest(model_name="add_sub")
        data = np.zeros(elements, np.uint8).tobytes()
        if where == "bytes":
            data = b"shared_memory_region" + data
        t = r.inputs.add(name="INPUT0", datatype="UINT8", shape=[len(data)])
        if where == "input":
            t.parameters["shared_memory_region"].string_param = "x"
        o = r.outputs.add(name="OUTPUT0")
        if where == "output":
            o.parameters["shared_memory_region"].string_param = "x"
        r.raw_input_contents.append(data)
        return r.SerializeToString()

    assert may_name_shared_memory(request("input")) and may_name_shared_memory(request("output"))
    assert not may_name_shared_memory(request("none")) and not may_name_shared_memory(request("bytes"))
    # Fields in any order (a hostile client need not follow protobuf's): the tensor bytes first.
    head = pb.ModelInferRequest(model_name="add_sub")
    head.raw_input_contents.append(b"\0" * elements)
    tail = pb.ModelInferRequest()
    tail.inputs.add(name="INPUT0").parameters["shared_memory_region"].string_param = "x"
    assert may_name_shared_memory(head.SerializeToString() + tail.SerializeToString())
