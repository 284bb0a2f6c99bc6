"""Shared memory regions are real POSIX objects, private to their client, bounded, and freed with it.

Against a real runtime process (port 0). Each "client" is its own gRPC
channel with a local subchannel pool, so it is its own TCP connection (gRPC
would otherwise share one connection between channels to the same target).
"""

from __future__ import annotations

import contextlib
import os
import time

import grpc
import numpy as np
import pytest
from conftest import EXAMPLES, RuntimeProcess
from test_runtime_helpers import RPC_TIMEOUT_S, rpc_error

from meshserve.clients import SharedMemoryRegion
from meshserve.clients.shared_memory import tensor_parameters
from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc
from meshserve.runtime.shared_memory import MAX_REGIONS_PER_CLIENT, SharedMemoryRegistry

# The janitor sweeps every second; a loaded 2-core machine may take a few.
RELEASE_TIMEOUT_S = 15.0
# Descriptors the runtime opens and closes on its own (a connection, an epoll) while the test counts.
SLACK = 4


@pytest.fixture(scope="module")
def runtime():
    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(EXAMPLES),
                              "--model", "add_sub"])
    yield process
    process.stop()


@contextlib.contextmanager
def connection(address: str):
    """A stub on a TCP connection of its own: one client."""
    channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT_S)
        yield pb_grpc.GRPCInferenceServiceStub(channel)
    finally:
        channel.close()


def register(stub, name: str, region: SharedMemoryRegion):
    return stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
        name=name, key=region.key, offset=0, byte_size=region.byte_size), timeout=RPC_TIMEOUT_S)


def status(stub, name: str = "") -> set[str]:
    return set(stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name=name),
                                             timeout=RPC_TIMEOUT_S).regions)


def _shm(target, name: str, byte_size: int = 2 * 16 * 4) -> None:
    for key, value in tensor_parameters(name, 0, byte_size).items():
        if isinstance(value, str):
            target[key].string_param = value
        else:
            target[key].int64_param = value


def add_sub(input_region: str = "", output_region: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add_sub")
    first = request.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 16])
    second = request.inputs.add(name="INPUT1", datatype="FP32", shape=[2, 16])
    ones = np.ones((2, 16), np.float32).tobytes()
    for tensor, region in ((first, input_region), (second, "")):
        if region:
            _shm(tensor.parameters, region)
        else:
            request.raw_input_contents.append(ones)
    if output_region:
        _shm(request.outputs.add(name="OUTPUT0").parameters, output_region)
    return request


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_hard_link_planted_in_dev_shm_is_not_a_shared_memory_object(tmp_path):
    name = f"meshserve_hardlink_{os.getpid()}"
    with SharedMemoryRegion(64) as original:
        link = os.path.join("/dev/shm", name)
        os.link(os.path.join("/dev/shm", original.key.lstrip("/")), link)
        try:
            registry = SharedMemoryRegistry()
            with pytest.raises(Exception) as refused:
                registry.register("linked", name, 0, 8)
            assert "2 hard links" in str(refused.value)
            assert len(registry) == 0
        finally:
            os.unlink(link)


def test_a_region_of_another_client_cannot_be_named_read_written_queried_or_unregistered(runtime):
    with SharedMemoryRegion(1024) as region, connection(runtime.address) as owner, \
            connection(runtime.address) as intruder:
        region.write(np.full((2, 16), 7, np.float32))
        register(owner, "mine", region)
        assert owner.ModelInfer(add_sub(input_region="mine"), timeout=RPC_TIMEOUT_S).raw_output_contents

        assert status(intruder) == set()
        for call, request in (
            (intruder.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest(name="mine")),
            (intruder.ModelInfer, add_sub(input_region="mine")),     # read
            (intruder.ModelInfer, add_sub(output_region="mine")),    # write
        ):
            err = rpc_error(call, request)
            assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
            assert "'mine' is not registered" in err.details()
        intruder.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="mine"),
                                              timeout=RPC_TIMEOUT_S)
        intruder.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=RPC_TIMEOUT_S)
        assert status(owner) == {"mine"}                # untouched by the intruder
        register(intruder, "mine", region)              # its own namespace: no clash
        owner.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=RPC_TIMEOUT_S)
        assert status(intruder) == {"mine"}
        intruder.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=RPC_TIMEOUT_S)


def test_a_registration_flood_is_refused_past_the_quota_and_a_closed_connection_frees_its_regions(runtime):
    pid = runtime.proc.pid
    with SharedMemoryRegion(4096) as region:
        with connection(runtime.address) as client:
            baseline = open_descriptors(pid)
            for index in range(MAX_REGIONS_PER_CLIENT):
                register(client, f"r{index}", region)
            err = rpc_error(client.SystemSharedMemoryRegister, pb.SystemSharedMemoryRegisterRequest(
                name="one-more", key=region.key, offset=0, byte_size=region.byte_size))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"already has {MAX_REGIONS_PER_CLIENT} shared memory regions" in err.details()
            held = open_descriptors(pid)
            assert held >= baseline + MAX_REGIONS_PER_CLIENT - SLACK      # one descriptor per region
        deadline = time.monotonic() + RELEASE_TIMEOUT_S
        while open_descriptors(pid) > baseline + SLACK and time.monotonic() < deadline:
            time.sleep(0.1)
        assert open_descriptors(pid) <= baseline + SLACK, f"closing the connection freed {held - open_descriptors(pid)}"
        with connection(runtime.address) as next_client:       # the runtime serves on
            register(next_client, "r0", region)
            assert status(next_client) == {"r0"}
            next_client.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(),
                                                     timeout=RPC_TIMEOUT_S)


def test_a_runtime_started_without_shared_memory_refuses_registration():
    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(EXAMPLES),
                              "--model", "add_sub", "--shared-memory", "none"])
    try:
        with SharedMemoryRegion(64) as region, connection(process.address) as stub:
            err = rpc_error(stub.SystemSharedMemoryRegister, pb.SystemSharedMemoryRegisterRequest(
                name="r", key=region.key, offset=0, byte_size=64))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--shared-memory none" in err.details()
            extensions = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=RPC_TIMEOUT_S).extensions
            assert "system_shared_memory" not in extensions
    finally:
        process.stop()


def test_peer_keys_match_the_kernels_socket_table():
    import socket

    from meshserve.common.peer_connections import open_peers, peer_key

    assert peer_key("ipv4:127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert peer_key("ipv6:[::1]:5000") == peer_key("ipv6:%5B::1%5D:5000") == ("::1", 5000)
    assert peer_key("ipv6:[::ffff:127.0.0.1]:5000") == ("127.0.0.1", 5000)
    assert peer_key("unix:/tmp/socket") is None
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        assert client.getsockname() in open_peers(port)
        client.close()
        deadline = time.monotonic() + RELEASE_TIMEOUT_S
        while ("127.0.0.1", client_port := accepted.getpeername()[1]) in open_peers(port) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ("127.0.0.1", client_port) not in open_peers(port)
        accepted.close()
