"""System shared memory against one real runtime (port 0) serving add_sub and a 4 MB echo model.

Every segment a test creates is unlinked by the test (``SharedMemoryRegion``
closes in a ``with``/fixture); ``no_leaked_segments`` checks /dev/shm after
each test for our prefix.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest
from conftest import EXAMPLES, REPO_ROOT, RuntimeProcess
from test_runtime_helpers import (
    RPC_TIMEOUT_S,
    assert_status,
    check_add_sub,
    decode_outputs,
    infer_request,
    open_stub,
    rpc_error,
)

from meshserve.clients import InferenceClient, InvalidArgument, NotFound, SharedMemory, SharedMemoryRegion
from meshserve.clients.shared_memory import tensor_parameters
from meshserve.common import tensors
from meshserve.protos.inference import grpc_service_pb2 as pb

ECHO_ELEMENTS = 1 << 20  # 4 MiB of FP32
PREFIX = "meshserve_"


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    repository = tmp_path_factory.mktemp("shm_repository")
    shutil.copytree(EXAMPLES / "add_sub", repository / "add_sub")
    shutil.copytree(REPO_ROOT / "bench" / "models" / "echo_fp32", repository / "echo_fp32")
    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(repository)])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def stub(runtime):
    channel, stub = open_stub(runtime.address)
    yield stub
    channel.close()


@pytest.fixture(scope="module")
def client(runtime):
    with InferenceClient(runtime.address, timeout=RPC_TIMEOUT_S) as client:
        yield client


def _segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(PREFIX)}


@pytest.fixture(autouse=True)
def no_leaked_segments(stub):
    before = _segments()
    yield
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=RPC_TIMEOUT_S)
    assert _segments() <= before, "a test left a shared memory segment behind"


@pytest.fixture
def region():
    with SharedMemoryRegion(8 << 20) as region:
        yield region


def register(stub, region: SharedMemoryRegion, name: str | None = None, key: str | None = None,
             offset: int = 0, byte_size: int | None = None):
    request = pb.SystemSharedMemoryRegisterRequest(
        name=name or region.name, key=key or region.key, offset=offset,
        byte_size=region.byte_size if byte_size is None else byte_size)
    return stub.SystemSharedMemoryRegister(request, timeout=RPC_TIMEOUT_S)


def set_parameters(target, parameters: dict) -> None:
    target["shared_memory_region"].string_param = parameters["shared_memory_region"]
    target["shared_memory_offset"].int64_param = parameters["shared_memory_offset"]
    target["shared_memory_byte_size"].int64_param = parameters["shared_memory_byte_size"]


def add_sub_request(region_name: str, byte_size: int = 2 * 16 * 4, offset: int = 0) -> pb.ModelInferRequest:
    """INPUT0 from the region at ``offset``, INPUT1 (ones) as the only raw_input_contents entry."""
    request = pb.ModelInferRequest(model_name="add_sub")
    first = request.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 16])
    set_parameters(first.parameters, tensor_parameters(region_name, offset, byte_size))
    request.inputs.add(name="INPUT1", datatype="FP32", shape=[2, 16])
    request.raw_input_contents.append(np.ones((2, 16), np.float32).tobytes())
    return request


def test_server_metadata_lists_system_shared_memory(stub):
    response = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=RPC_TIMEOUT_S)
    assert "system_shared_memory" in response.extensions
    assert "cuda_shared_memory" not in response.extensions


def test_register_status_unregister(stub, region):
    register(stub, region)  # "/meshserve_..." (Triton's form)
    register(stub, region, name="second", key=region.key.lstrip("/"), offset=4096, byte_size=1024)  # Python's form
    everything = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=RPC_TIMEOUT_S)
    assert set(everything.regions) == {region.name, "second"}
    one = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="second"), timeout=RPC_TIMEOUT_S)
    status = one.regions["second"]
    assert (status.name, status.key, status.offset, status.byte_size) == (
        "second", region.key.lstrip("/"), 4096, 1024)

    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="second"), timeout=RPC_TIMEOUT_S)
    left = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=RPC_TIMEOUT_S)
    assert set(left.regions) == {region.name}
    error = rpc_error(stub.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest(name="second"))
    assert_status(error, grpc.StatusCode.NOT_FOUND, "second")

    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=RPC_TIMEOUT_S)  # all
    assert not stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=RPC_TIMEOUT_S).regions


def test_register_errors_name_the_problem(stub, region):
    error = rpc_error(stub.SystemSharedMemoryRegister, pb.SystemSharedMemoryRegisterRequest(
        name="ghost", key="/meshserve_no_such_key", byte_size=64))
    assert_status(error, grpc.StatusCode.NOT_FOUND, "/meshserve_no_such_key")

    register(stub, region)
    error = rpc_error(stub.SystemSharedMemoryRegister, pb.SystemSharedMemoryRegisterRequest(
        name=region.name, key=region.key, byte_size=64))
    assert_status(error, grpc.StatusCode.ALREADY_EXISTS, region.name)

    error = rpc_error(stub.SystemSharedMemoryRegister, pb.SystemSharedMemoryRegisterRequest(
        name="too_far", key=region.key, offset=region.byte_size - 8, byte_size=64))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, f"offset {region.byte_size - 8}", "byte_size 64")

    error = rpc_error(stub.SystemSharedMemoryRegister, pb.SystemSharedMemoryRegisterRequest(
        name="escape", key="/../etc/passwd", byte_size=64))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "/../etc/passwd")


def test_small_tensors_through_shared_memory(client):
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.full((2, 16), 0.5, np.float32)
    with SharedMemory(client, 1 << 16) as shm:
        both = shm.infer("add_sub", {"INPUT0": a, "INPUT1": b}, outputs=["OUTPUT0", "OUTPUT1"])
        np.testing.assert_array_equal(both["OUTPUT0"], a + b)
        np.testing.assert_array_equal(both["OUTPUT1"], a - b)
        assert not both["OUTPUT0"].flags.writeable  # a view of the region
        by_grpc = shm.infer("add_sub", {"INPUT0": a, "INPUT1": b})  # outputs come back raw
        np.testing.assert_array_equal(by_grpc["OUTPUT1"], a - b)


def test_4mb_in_and_out_through_shared_memory(client, stub):
    x = np.random.default_rng(7).standard_normal(ECHO_ELEMENTS).astype(np.float32)
    with SharedMemory(client, 2 * x.nbytes) as shm:
        for scale in (1.0, -3.0):  # the second call overwrites the first in place
            out = shm.infer("echo_fp32", {"INPUT0": x * scale}, outputs=["OUTPUT0"])
            np.testing.assert_array_equal(out["OUTPUT0"], x * scale)

        # On the wire: metadata and the region's parameters, an empty raw entry, no bytes. The
        # stub is another connection, another client: it registers the object for itself.
        register(stub, shm.region)
        request = pb.ModelInferRequest(model_name="echo_fp32")
        tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[ECHO_ELEMENTS])
        set_parameters(tensor.parameters, tensor_parameters(shm.region.name, 0, x.nbytes))
        output = request.outputs.add(name="OUTPUT0")
        set_parameters(output.parameters, tensor_parameters(shm.region.name, x.nbytes, x.nbytes))
        shm.region.write(x)
        response = stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
        assert response.ByteSize() < 1024
        assert list(response.raw_output_contents) == [b""]
        (meta,) = response.outputs
        assert (meta.name, meta.datatype, list(meta.shape)) == ("OUTPUT0", "FP32", [ECHO_ELEMENTS])
        assert meta.parameters["shared_memory_region"].string_param == shm.region.name
        assert meta.parameters["shared_memory_offset"].int64_param == x.nbytes
        assert meta.parameters["shared_memory_byte_size"].int64_param == x.nbytes
        np.testing.assert_array_equal(shm.region.read("FP32", [ECHO_ELEMENTS], offset=x.nbytes), x)


def test_shared_memory_inputs_mix_with_raw_inputs(stub, region):
    register(stub, region)
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    region.write(a, offset=128)
    response = stub.ModelInfer(add_sub_request(region.name, offset=128), timeout=RPC_TIMEOUT_S)
    names = [output.name for output in response.outputs]
    outputs = {name: tensors.from_raw("FP32", [2, 16], raw) for name, raw in zip(names, response.raw_output_contents, strict=True)}
    np.testing.assert_array_equal(outputs["OUTPUT0"], a + 1)
    np.testing.assert_array_equal(outputs["OUTPUT1"], a - 1)

    # raw_input_contents is one per input *not* in shared memory: two entries here is one too many.
    request = add_sub_request(region.name)
    request.raw_input_contents.append(np.ones((2, 16), np.float32).tobytes())
    error = rpc_error(stub.ModelInfer, request)
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents", "shared memory")


def test_stream_reads_and_writes_shared_memory(stub, region):
    register(stub, region)
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    region.write(a)
    request = add_sub_request(region.name)
    output = request.outputs.add(name="OUTPUT0")
    set_parameters(output.parameters, tensor_parameters(region.name, 4096, 128))
    (message,) = list(stub.ModelStreamInfer(iter([request]), timeout=RPC_TIMEOUT_S))
    assert not message.error_message
    np.testing.assert_array_equal(region.read("FP32", [2, 16], offset=4096), a + 1)


@pytest.mark.parametrize("case, code, words", [
    ("unregistered region", grpc.StatusCode.NOT_FOUND, ["INPUT0", "no_such_region", "not registered"]),
    ("outside the region", grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "outside region", "8388600"]),
    ("size mismatch", grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "shared_memory_byte_size 64", "needs 128"]),
    ("output too small", grpc.StatusCode.INVALID_ARGUMENT, ["OUTPUT0", "needs 128 bytes", "gives it 16"]),
    ("output in an unregistered region", grpc.StatusCode.NOT_FOUND, ["OUTPUT1", "no_such_region"]),
    ("no byte size", grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0", "shared_memory_byte_size", "required"]),
])
def test_bad_shared_memory_tensors_name_the_problem(stub, region, case, code, words):
    register(stub, region)
    if case == "unregistered region":
        request = add_sub_request("no_such_region")
    elif case == "outside the region":
        request = add_sub_request(region.name, offset=region.byte_size - 8)
    elif case == "size mismatch":
        request = add_sub_request(region.name, byte_size=64)
    elif case == "output too small":
        request = add_sub_request(region.name)
        set_parameters(request.outputs.add(name="OUTPUT0").parameters, tensor_parameters(region.name, 4096, 16))
    elif case == "output in an unregistered region":
        request = add_sub_request(region.name)
        set_parameters(request.outputs.add(name="OUTPUT1").parameters, tensor_parameters("no_such_region", 0, 128))
    else:
        request = add_sub_request(region.name)
        del request.inputs[0].parameters["shared_memory_byte_size"]
    error = rpc_error(stub.ModelInfer, request)
    assert_status(error, code, *words)
    if case in ("outside the region", "size mismatch", "output too small"):
        assert region.name in error.details()


@contextlib.contextmanager
def shm_object(size: int):
    """A raw shared memory object the test can shrink: (key, fd), never mapped in this process."""
    name = f"{PREFIX}raw_{os.getpid()}_{next(_OBJECT_NUMBERS)}"
    fd = os.open(os.path.join("/dev/shm", name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        yield "/" + name, fd
    finally:
        os.close(fd)
        os.unlink(os.path.join("/dev/shm", name))


_OBJECT_NUMBERS = itertools.count()


def test_a_region_its_client_shrinks_is_invalid_argument_and_the_runtime_survives(runtime, stub):
    """ftruncate to 0 after registering: reading it or writing an output into it used to SIGBUS the runtime."""
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    with shm_object(4096) as (key, fd):
        os.pwrite(fd, a.tobytes(), 0)
        stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
            name="shrinking", key=key, byte_size=4096), timeout=RPC_TIMEOUT_S)
        reads = add_sub_request("shrinking")
        writes = infer_request("add_sub", {"INPUT0": a, "INPUT1": np.ones((2, 16), np.float32)})
        set_parameters(writes.outputs.add(name="OUTPUT0").parameters, tensor_parameters("shrinking", 2048, 128))
        stub.ModelInfer(reads, timeout=RPC_TIMEOUT_S)
        stub.ModelInfer(writes, timeout=RPC_TIMEOUT_S)

        os.ftruncate(fd, 0)
        for request, tensor in ((reads, "input 'INPUT0'"), (writes, "output 'OUTPUT0'")):
            error = rpc_error(stub.ModelInfer, request)
            assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, tensor, "region 'shrinking'", "shrunk", "0 bytes")
        (message,) = list(stub.ModelStreamInfer(iter([reads]), timeout=RPC_TIMEOUT_S))
        assert message.error_message.startswith("INVALID_ARGUMENT: ") and "shrinking" in message.error_message
        assert runtime.proc.poll() is None, "the runtime died"
        check_add_sub(stub, batch=2)  # everything else still served

        os.ftruncate(fd, 4096)  # restored: the same registration works again
        os.pwrite(fd, a.tobytes(), 0)
        response = stub.ModelInfer(writes, timeout=RPC_TIMEOUT_S)
        assert response.outputs[0].parameters["shared_memory_byte_size"].int64_param == 128
        np.testing.assert_array_equal(np.frombuffer(os.pread(fd, 128, 2048), np.float32).reshape(2, 16), a + 1)
        response = stub.ModelInfer(reads, timeout=RPC_TIMEOUT_S)
        np.testing.assert_array_equal(decode_outputs(response)["OUTPUT0"], a + 1)


def test_bad_shared_memory_keys_are_invalid_argument_without_a_traceback(runtime, stub, tmp_path):
    with shm_object(4096) as (key, _):
        fifo = f"{PREFIX}fifo_{os.getpid()}"
        link = f"{PREFIX}link_{os.getpid()}"
        os.mkfifo(os.path.join("/dev/shm", fifo))
        os.symlink(tmp_path / "target", os.path.join("/dev/shm", link))
        (tmp_path / "target").write_bytes(bytes(4096))
        try:
            for bad, fragments in ((key + "\0tail", ["not a shared memory object name"]),
                                   ("\0", ["not a shared memory object name"]),
                                   ("/" + "k" * 300, ["longer than 255 bytes"]),
                                   ("/" + fifo, [fifo, "not a regular file"]),
                                   ("/" + link, [link, "cannot be opened"])):
                error = rpc_error(stub.SystemSharedMemoryRegister, pb.SystemSharedMemoryRegisterRequest(
                    name="bad_key", key=bad, byte_size=64))
                assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, *fragments)
                assert len(error.details()) < 300
        finally:
            os.unlink(os.path.join("/dev/shm", fifo))
            os.unlink(os.path.join("/dev/shm", link))
    assert not stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=RPC_TIMEOUT_S).regions
    check_add_sub(stub)
    assert "Traceback" not in "".join(runtime.output)


def test_client_errors_are_taxonomy_types(client):
    with SharedMemory(client, 4096) as shm:
        with pytest.raises(InvalidArgument, match="no room"):
            shm.infer("add_sub", {"INPUT0": np.ones((2, 16), np.float32), "INPUT1": np.ones((2, 16), np.float32)},
                      outputs={"OUTPUT0": 8192})
        shm.unregister()
        with pytest.raises(NotFound, match=shm.region.name):
            shm.infer("add_sub", {"INPUT0": np.ones((1, 16), np.float32), "INPUT1": np.ones((1, 16), np.float32)})


def test_cuda_shared_memory_stays_unimplemented(stub):
    error = rpc_error(stub.CudaSharedMemoryRegister, pb.CudaSharedMemoryRegisterRequest(name="gpu"))
    assert_status(error, grpc.StatusCode.UNIMPLEMENTED, "CUDA shared memory")


# Runs in a child process: tritonclient.grpc cannot share a process with protos.inference.
_TRITON_SHM_SCRIPT = textwrap.dedent("""
    import importlib.resources, json, sys, types
    import numpy as np
    try:
        import pkg_resources  # tritonclient.utils.shared_memory finds its libcshm.so with it
    except ImportError:  # setuptools absent: the one function it uses
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, name: str(importlib.resources.files(package) / name)
        sys.modules["pkg_resources"] = shim
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm

    address, key = sys.argv[1], sys.argv[2]
    report = {}
    client = grpcclient.InferenceServerClient(url=address)
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.full((2, 16), 2.0, np.float32)
    size = a.nbytes
    handle = shm.create_shared_memory_region("triton_io", key, 4 * size)
    try:
        shm.set_shared_memory_region(handle, [a, b])
        client.register_system_shared_memory("triton_io", key, 4 * size)
        status = client.get_system_shared_memory_status(as_json=True)
        report["status"] = [[r["name"], r["key"], int(r.get("byte_size", 0))] for r in status.get("regions", {}).values()]
        inputs = [grpcclient.InferInput("INPUT0", [2, 16], "FP32"), grpcclient.InferInput("INPUT1", [2, 16], "FP32")]
        inputs[0].set_shared_memory("triton_io", size, offset=0)
        inputs[1].set_shared_memory("triton_io", size, offset=size)
        outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
        outputs[0].set_shared_memory("triton_io", size, offset=2 * size)
        outputs[1].set_shared_memory("triton_io", size, offset=3 * size)
        result = client.infer("add_sub", inputs, outputs=outputs, client_timeout=30)
        out0 = result.get_output("OUTPUT0")
        out0_data = shm.get_contents_as_numpy(handle, np.float32, [2, 16], offset=2 * size)
        out1_data = shm.get_contents_as_numpy(handle, np.float32, [2, 16], offset=3 * size)
        report["output0"] = [out0.name, out0.datatype, list(out0.shape)]
        report["sum_ok"] = bool(np.array_equal(out0_data, a + b))
        report["diff_ok"] = bool(np.array_equal(out1_data, a - b))

        mixed = [grpcclient.InferInput("INPUT0", [2, 16], "FP32"), grpcclient.InferInput("INPUT1", [2, 16], "FP32")]
        mixed[0].set_shared_memory("triton_io", size, offset=0)
        mixed[1].set_data_from_numpy(np.ones((2, 16), np.float32))
        result = client.infer("add_sub", mixed, client_timeout=30)
        report["mixed_ok"] = bool(np.array_equal(result.as_numpy("OUTPUT0"), a + 1))
        client.unregister_system_shared_memory("triton_io")
        report["after"] = len(client.get_system_shared_memory_status(as_json=True).get("regions", {}))
    finally:
        shm.destroy_shared_memory_region(handle)
    client.close()
    print("REPORT " + json.dumps(report))
""")


def test_tritonclient_shared_memory_works_unchanged(runtime):
    key = f"/{PREFIX}triton_{os.getpid()}"
    completed = subprocess.run(
        [sys.executable, "-c", _TRITON_SHM_SCRIPT, runtime.address, key],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    line = next(line for line in completed.stdout.splitlines() if line.startswith("REPORT "))
    report = json.loads(line[len("REPORT "):])
    assert report["status"] == [["triton_io", key, 4 * 128]]
    assert report["output0"] == ["OUTPUT0", "FP32", [2, 16]]
    assert report["sum_ok"] and report["diff_ok"] and report["mixed_ok"]
    assert report["after"] == 0
