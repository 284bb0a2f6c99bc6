"""Shared memory without a server: the runtime's registry and the client's region, in one process."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from meshserve.clients import SharedMemoryRegion
from meshserve.common.errors import AlreadyExists, InvalidArgument, NotFound
from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.runtime.request import ModelSignature, decode_request
from meshserve.runtime.shared_memory import SharedMemoryRegistry, TensorLocation, shm_path, tensor_location
from meshserve.runtime.tensor_spec import TensorSpec


@pytest.fixture
def region():
    with SharedMemoryRegion(1 << 16) as region:
        yield region
    assert not os.path.exists(shm_path(region.key))


@pytest.fixture
def registry():
    registry = SharedMemoryRegistry()
    yield registry
    registry.close()


def test_keys_in_either_form_and_nothing_outside_the_namespace():
    assert shm_path("/abc") == shm_path("abc") == "/dev/shm/abc"
    for bad in ("", "/", "/a/b", "..", "/../etc/passwd", "/a\0b", "\0", "/" + "k" * 256):
        with pytest.raises(InvalidArgument):
            shm_path(bad)


def test_registry_maps_the_window_it_was_given(registry, region):
    region.buffer[4096:4104] = b"abcdefgh"
    registry.register("r", region.key, 4096, 1024)  # an offset past the first page
    assert registry.read(TensorLocation("r", 0, 8), "input 'X'") == b"abcdefgh"
    with pytest.raises(AlreadyExists, match="'r'"):
        registry.register("r", region.key, 0, 8)
    with pytest.raises(InvalidArgument, match="offset 1020 .* outside region 'r'"):
        registry.read(TensorLocation("r", 1020, 8), "input 'X'")
    with pytest.raises(NotFound, match="input 'X': .*'s'"):
        registry.read(TensorLocation("s", 0, 8), "input 'X'")
    with pytest.raises(InvalidArgument, match="byte_size must be positive"):
        registry.register("zero", region.key, 0, 0)


def test_unregister_while_a_request_holds_the_region(registry, region):
    """A request that resolved its output region before it was unregistered gets NotFound when it writes."""
    registry.register("r", region.key, 0, 64)
    held = registry.region(TensorLocation("r", 0, 64), "output 'Y'")
    registry.unregister("r")
    registry.unregister("r")  # idempotent, as in Triton
    with pytest.raises(NotFound, match="output 'Y': .*'r' was unregistered"):
        held.write(TensorLocation("r", 0, 4), b"abcd", "output 'Y'")
    assert registry.status() == []


def test_a_shrunk_object_is_refused_on_every_use_and_works_again_when_restored(registry):
    """The server never maps the client's object: a shrink is an error naming the region, not a SIGBUS."""
    path = f"/dev/shm/meshserve_units_shrink_{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 8192)
        os.pwrite(fd, b"abcdefgh", 4096)
        registry.register("r", os.path.basename(path), 4096, 4096)
        location = TensorLocation("r", 0, 8)
        assert registry.read(location, "input 'X'") == b"abcdefgh"
        for size in (0, 4096, 8191):  # anything short of the registered window
            os.ftruncate(fd, size)
            with pytest.raises(InvalidArgument, match=f"input 'X': .*region 'r' has shrunk: .* now {size} bytes"):
                registry.read(location, "input 'X'")
            with pytest.raises(InvalidArgument, match="output 'Y': .*region 'r' has shrunk"):
                registry.region(location, "output 'Y'").write(location, b"12345678", "output 'Y'")
        os.ftruncate(fd, 8192)
        registry.region(location, "output 'Y'").write(location, b"12345678", "output 'Y'")
        assert os.pread(fd, 8, 4096) == b"12345678" == registry.read(location, "input 'X'")
    finally:
        registry.close()
        os.close(fd)
        os.unlink(path)


def test_keys_that_are_not_shared_memory_objects_are_refused(registry, tmp_path):
    fifo = f"/dev/shm/meshserve_units_fifo_{os.getpid()}"
    link = f"/dev/shm/meshserve_units_link_{os.getpid()}"
    (tmp_path / "target").write_bytes(bytes(64))
    os.mkfifo(fifo)
    os.symlink(tmp_path / "target", link)
    try:
        with pytest.raises(InvalidArgument, match="not a regular file"):
            registry.register("fifo", os.path.basename(fifo), 0, 8)
        with pytest.raises(InvalidArgument, match="cannot be opened"):
            registry.register("link", os.path.basename(link), 0, 8)
        with pytest.raises(InvalidArgument, match="not a shared memory object name"):
            registry.register("nul", "/a\0b", 0, 8)
    finally:
        os.unlink(fifo)
        os.unlink(link)
    assert registry.status() == []


def test_client_region_close_with_live_views(region):
    array = np.arange(8, dtype=np.int64)
    region.write(array, offset=64)
    view = region.read("INT64", [8], offset=64)
    assert not view.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        region.close()
        np.testing.assert_array_equal(view, array)  # still mapped
        del view


def test_bytes_tensors_round_trip_through_a_region(region):
    words = np.array([b"alpha", b"", b"gamma"], dtype=object)
    datatype, size = region.write(words, offset=128)
    assert (datatype, size) == ("BYTES", 3 * 4 + 10)
    assert list(region.read("BYTES", [3], offset=128, byte_size=size)) == list(words)


def test_parameters_are_checked():
    tensor = pb.ModelInferRequest.InferInputTensor(name="X")
    assert tensor_location(tensor.parameters, "input 'X'") is None
    tensor.parameters["shared_memory_region"].string_param = "r"
    with pytest.raises(InvalidArgument, match="shared_memory_byte_size.*required"):
        tensor_location(tensor.parameters, "input 'X'")
    tensor.parameters["shared_memory_byte_size"].int64_param = -1
    with pytest.raises(InvalidArgument, match="non-negative"):
        tensor_location(tensor.parameters, "input 'X'")
    tensor.parameters["shared_memory_byte_size"].uint64_param = 8
    tensor.parameters["shared_memory_offset"].int64_param = 16
    assert tensor_location(tensor.parameters, "input 'X'") == TensorLocation("r", 16, 8)


def test_decoded_inputs_are_read_only_copies_of_the_region(registry, region):
    signature = ModelSignature("m", {"X": TensorSpec("X", "FP32", (4,))}, {"Y": TensorSpec("Y", "FP32", (4,))}, 0)
    region.write(np.arange(4, dtype=np.float32))
    registry.register("r", region.key, 0, region.byte_size)
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="X", datatype="FP32", shape=[4])
    tensor.parameters["shared_memory_region"].string_param = "r"
    tensor.parameters["shared_memory_byte_size"].int64_param = 16
    decoded = decode_request(request, signature, registry).inputs["X"]
    assert not decoded.flags.writeable
    region.buffer[0:4] = np.float32(9).tobytes()  # a copy: the client's later write does not show through
    np.testing.assert_array_equal(decoded, np.arange(4, dtype=np.float32))
