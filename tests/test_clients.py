"""Tests of the client library (clients/).

Unit: encoding round trips, error mapping, the retry policy with a fake
callable and fake clock (no sleeping), trace metadata. Component: a tiny
in-process gRPC server on port 0 for retries and trace metadata, and the real
runtime serving examples/models for everything a client does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import pathlib
import sys
import threading

import grpc
import ml_dtypes
import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider

from meshserve.clients import (
    AsyncInferenceClient,
    DeadlineExceeded,
    FailedPrecondition,
    InferenceClient,
    Internal,
    InvalidArgument,
    MeshError,
    NotFound,
    ResourceExhausted,
    RetryPolicy,
    Unavailable,
)
from meshserve.clients.encoding import (
    build_infer_request,
    build_stream_request,
    decode_infer_response,
    decode_stream_response,
    parameter_value,
)
from meshserve.clients.retry import async_call_with_retries, call_with_retries
from meshserve.clients.shared_memory import OFFSET_PARAMETER, REGION_PARAMETER, SharedMemoryRegion, decode_response
from meshserve.clients.status import from_rpc_error, from_stream_error
from meshserve.clients.tracing import trace_metadata
from meshserve.common import errors
from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples" / "models"

# ---------------------------------------------------------------- helpers


def echo_response(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """What an identity model would answer: the inputs as outputs, same encoding."""
    response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
    for tensor in request.inputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape).contents.CopyFrom(
            tensor.contents
        )
    response.raw_output_contents.extend(request.raw_input_contents)
    return response


def round_trip(inputs, **options):
    return decode_infer_response(echo_response(build_infer_request("m", inputs, **options)))


NUMERIC = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([0, 7, 255], dtype=np.uint8),
    "UINT16": np.array([0, 65535], dtype=np.uint16),
    "UINT32": np.array([[1, 2], [3, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([2**64 - 1, 0], dtype=np.uint64),
    "INT8": np.array([-128, 127], dtype=np.int8),
    "INT16": np.array([-32768, 32767], dtype=np.int16),
    "INT32": np.arange(-6, 6, dtype=np.int32).reshape(3, 4),
    "INT64": np.array([-(2**63), 2**63 - 1], dtype=np.int64),
    "FP32": np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 3, 2),
    "FP64": np.array([np.pi, -np.e, 1e300]),
}
RAW_ONLY = {
    "FP16": np.array([0.5, -1.25, 65504], dtype=np.float16),
    "BF16": np.array([1.5, -3.0, 1e30], dtype=ml_dtypes.bfloat16),
}


# ---------------------------------------------------------------- encoding (unit)


@pytest.mark.parametrize("use_raw", [True, False])
@pytest.mark.parametrize("datatype", sorted(NUMERIC))
def test_numeric_round_trip(datatype, use_raw):
    array = NUMERIC[datatype]
    request = build_infer_request("m", {"X": array}, use_raw=use_raw)
    assert request.inputs[0].datatype == datatype
    assert list(request.inputs[0].shape) == list(array.shape)
    assert len(request.raw_input_contents) == (1 if use_raw else 0)
    out = decode_infer_response(echo_response(request))["X"]
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("datatype", sorted(RAW_ONLY))
def test_half_precision_round_trip_raw(datatype):
    array = RAW_ONLY[datatype]
    out = round_trip({"X": array})["X"]
    assert out.dtype == array.dtype
    np.testing.assert_array_equal(out.astype(np.float32), array.astype(np.float32))


@pytest.mark.parametrize("datatype", sorted(RAW_ONLY))
def test_half_precision_has_no_typed_contents(datatype):
    with pytest.raises(InvalidArgument, match="'X'.*raw"):
        build_infer_request("m", {"X": RAW_ONLY[datatype]}, use_raw=False)


@pytest.mark.parametrize("use_raw", [True, False])
def test_bytes_round_trip_str_bytes_and_object(use_raw):
    inputs = {
        "S": np.array([["héllo", ""], ["wörld", "x"]]),  # numpy str -> BYTES, utf-8
        "B": np.array([b"\x00\xff", b"abc"], dtype=object),
        "F": np.array([b"fixed", b"b"]),  # numpy S dtype
    }
    request = build_infer_request("m", inputs, use_raw=use_raw)
    assert [t.datatype for t in request.inputs] == ["BYTES"] * 3
    out = decode_infer_response(echo_response(request))
    assert out["S"].dtype == object and out["S"].shape == (2, 2)
    assert out["S"].tolist() == [["héllo".encode(), b""], ["wörld".encode(), b"x"]]
    assert out["B"].tolist() == [b"\x00\xff", b"abc"]
    assert out["F"].tolist() == [b"fixed", b"b"]


def test_raw_inputs_are_one_buffer_per_input_in_order():
    a = np.ones(4, np.float32)
    b = np.array(["ab"])
    request = build_infer_request("m", {"A": a, "B": b})
    assert [t.name for t in request.inputs] == ["A", "B"]
    assert list(request.raw_input_contents) == [a.tobytes(), b"\x02\x00\x00\x00ab"]
    assert not request.inputs[0].HasField("contents")


def test_non_contiguous_and_list_inputs():
    array = np.arange(12, dtype=np.int32).reshape(3, 4).T  # Fortran order view
    out = round_trip({"X": array, "L": [1.0, 2.0]})
    np.testing.assert_array_equal(out["X"], array)
    np.testing.assert_array_equal(out["L"], [1.0, 2.0])


def test_request_fields_outputs_and_parameters():
    request = build_infer_request(
        "add_sub", {"X": np.zeros(1, np.float32)}, ["OUTPUT1"], version="3", request_id="r-1",
        parameters={"flag": True, "n": 5, "big": 2**64 - 1, "t": 0.25, "s": "text"},
    )
    assert (request.model_name, request.model_version, request.id) == ("add_sub", "3", "r-1")
    assert [o.name for o in request.outputs] == ["OUTPUT1"]
    values = {key: parameter_value(value) for key, value in request.parameters.items()}
    assert values == {"flag": True, "n": 5, "big": 2**64 - 1, "t": 0.25, "s": "text"}
    assert request.parameters["flag"].WhichOneof("parameter_choice") == "bool_param"
    assert request.parameters["big"].WhichOneof("parameter_choice") == "uint64_param"


def test_bad_inputs_raise_invalid_argument_naming_them():
    with pytest.raises(InvalidArgument, match="'Z'.*complex"):
        build_infer_request("m", {"Z": np.zeros(2, np.complex64)})
    with pytest.raises(InvalidArgument, match="parameter 'p'"):
        build_infer_request("m", {}, parameters={"p": [1]})
    with pytest.raises(InvalidArgument, match="list of output names"):
        build_infer_request("m", {}, "OUTPUT0")


def test_decode_rejects_malformed_responses():
    response = pb.ModelInferResponse(model_name="m")
    response.outputs.add(name="A", datatype="FP32", shape=[2])
    response.outputs.add(name="B", datatype="FP32", shape=[2])
    response.raw_output_contents.append(np.zeros(2, np.float32).tobytes())
    with pytest.raises(Internal, match="1 raw_output_contents for 2 outputs"):
        decode_infer_response(response)
    response.raw_output_contents.append(b"\x00" * 3)
    with pytest.raises(Internal, match="'B'"):
        decode_infer_response(response)


def test_shared_memory_output_parameters_are_read_as_integers_only():
    """The server's placement of an output is untrusted: an unset offset used to raise TypeError
    (it now means 0, as a missing one does) and a string offset was converted with int()."""
    with SharedMemoryRegion(4096) as region:
        region.write(np.arange(4, dtype=np.float32), 0)
        response = pb.ModelInferResponse(model_name="m")
        output = response.outputs.add(name="Y", datatype="FP32", shape=[4])
        output.parameters[REGION_PARAMETER].string_param = region.name
        output.parameters[OFFSET_PARAMETER].SetInParent()   # present, no value set
        np.testing.assert_array_equal(decode_response(response, region)["Y"], np.arange(4, dtype=np.float32))
        output.parameters[OFFSET_PARAMETER].string_param = "16"
        with pytest.raises(Internal, match="output 'Y' of model 'm': parameter 'shared_memory_offset' is '16'"):
            decode_response(response, region)


def test_decode_typed_contents_when_server_uses_them():
    response = pb.ModelInferResponse()
    output = response.outputs.add(name="Y", datatype="INT64", shape=[2, 2])
    output.contents.int64_contents.extend([1, 2, 3, 4])
    assert decode_infer_response(response)["Y"].tolist() == [[1, 2], [3, 4]]


def test_stream_request_asks_for_an_empty_final_response():
    request = build_stream_request("t", {"P": np.array(["a"])}, parameters={"x": 1})
    assert parameter_value(request.parameters["triton_enable_empty_final_response"]) is True
    assert parameter_value(request.parameters["x"]) == 1
    request = build_stream_request(
        "t", {"P": np.array(["a"])}, parameters={"triton_enable_empty_final_response": False}
    )
    assert parameter_value(request.parameters["triton_enable_empty_final_response"]) is False


def _stream_message(outputs: dict | None, final: bool | None) -> pb.ModelStreamInferResponse:
    response = echo_response(build_infer_request("t", outputs or {}))
    if final is not None:
        response.parameters["triton_final_response"].bool_param = final
    return pb.ModelStreamInferResponse(infer_response=response)


def test_decode_stream_responses():
    token = {"TOKEN": np.array([b" hi"], dtype=object)}
    outputs, final = decode_stream_response(_stream_message(token, False))
    assert outputs["TOKEN"].tolist() == [b" hi"] and final is False
    outputs, final = decode_stream_response(_stream_message(token, True))
    assert outputs["TOKEN"].tolist() == [b" hi"] and final is True
    assert decode_stream_response(_stream_message(None, True)) == (None, True)
    assert decode_stream_response(_stream_message(token, None))[1] is False


def test_stream_error_message_raises_its_taxonomy_error():
    with pytest.raises(InvalidArgument, match="bad prompt"):
        decode_stream_response(pb.ModelStreamInferResponse(error_message="INVALID_ARGUMENT: bad prompt"))


# ---------------------------------------------------------------- errors (unit)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str | None):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize(
    "error_type",
    [errors.InvalidArgument, errors.NotFound, errors.AlreadyExists, errors.FailedPrecondition,
     errors.ResourceExhausted, errors.DeadlineExceeded, errors.Unavailable, errors.Unimplemented,
     errors.Cancelled, errors.Internal],
)
def test_rpc_error_maps_to_taxonomy_with_server_message(error_type):
    error = from_rpc_error(FakeRpcError(error_type.code, "model 'x' says no"))
    assert type(error) is error_type and error.message == "model 'x' says no"


def test_rpc_error_without_type_or_details():
    error = from_rpc_error(FakeRpcError(grpc.StatusCode.DATA_LOSS, None))
    assert type(error) is MeshError and error.code is grpc.StatusCode.DATA_LOSS
    assert error.message == "DATA_LOSS"


@pytest.mark.parametrize(
    ("message", "error_type"),
    [
        ("INVALID_ARGUMENT: shape [3] does not match [1]", InvalidArgument),
        ("[StatusCode.NOT_FOUND] no model 'x'", NotFound),
        ("ResourceExhausted: queue full", ResourceExhausted),
        ("DEADLINE_EXCEEDED: too slow", DeadlineExceeded),
        ("predictor raised ValueError: boom", Internal),
        ("OK: odd", Internal),
        ("", Internal),
    ],
)
def test_stream_error_messages(message, error_type):
    error = from_stream_error(message)
    assert type(error) is error_type and error.message == message


# ---------------------------------------------------------------- retries (unit)


class FakeClock:
    def __init__(self):
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


def failing(*failures: MeshError, result="ok"):
    """A callable that raises ``failures`` in turn, then returns ``result``; records its timeouts."""
    calls: list[float | None] = []

    def attempt(remaining):
        calls.append(remaining)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return result

    return attempt, calls


NO_JITTER = RetryPolicy(max_retries=3, initial_backoff=0.1, max_backoff=0.25, jitter=0.0)


def test_unavailable_is_retried_with_bounded_exponential_backoff():
    clock = FakeClock()
    attempt, calls = failing(Unavailable("down"), Unavailable("down"), Unavailable("down"))
    assert call_with_retries(attempt, NO_JITTER, None, sleep=clock.sleep, clock=clock) == "ok"
    assert len(calls) == 4
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.25])


def test_retries_are_bounded_and_the_last_error_is_raised():
    clock = FakeClock()
    last = Unavailable("still down")
    attempt, calls = failing(Unavailable("a"), Unavailable("b"), Unavailable("c"), last)
    with pytest.raises(Unavailable) as info:
        call_with_retries(attempt, NO_JITTER, None, sleep=clock.sleep, clock=clock)
    assert info.value is last and len(calls) == 4


@pytest.mark.parametrize(
    "error",
    [InvalidArgument("x"), Internal("x"), DeadlineExceeded("x"), ResourceExhausted("x"),
     NotFound("x"), errors.Cancelled("x"), errors.Unimplemented("x")],
)
def test_other_codes_are_never_retried(error):
    clock = FakeClock()
    attempt, calls = failing(error)
    with pytest.raises(type(error)):
        call_with_retries(attempt, NO_JITTER, None, sleep=clock.sleep, clock=clock)
    assert len(calls) == 1 and clock.sleeps == []


def test_deadline_bounds_retries_and_each_attempt_gets_the_time_left():
    clock = FakeClock()
    attempt, calls = failing(Unavailable("a"), Unavailable("b"), Unavailable("c"))
    with pytest.raises(Unavailable, match="b"):
        call_with_retries(attempt, NO_JITTER, 0.25, sleep=clock.sleep, clock=clock)
    # 0.25 s: attempt, wait 0.1, attempt with 0.15 left; a 0.2 s wait would cross the deadline.
    assert calls == pytest.approx([0.25, 0.15])
    assert clock.sleeps == pytest.approx([0.1])


def test_zero_retries_and_jitter():
    policy = RetryPolicy.of(0)
    assert policy.max_retries == 0 and policy.next_delay(0, Unavailable("x"), None) is None
    jittery = RetryPolicy(initial_backoff=1.0, jitter=0.5)
    assert jittery.backoff(0, rand=lambda: 0.0) == 1.0
    assert jittery.backoff(0, rand=lambda: 1.0) == 0.5
    assert RetryPolicy.of(jittery) is jittery
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


def test_async_retries_share_the_policy():
    clock = FakeClock()
    attempts = failing(Unavailable("a"), Unavailable("b"))[0]

    async def attempt(remaining):
        return attempts(remaining)

    result = asyncio.run(
        async_call_with_retries(attempt, NO_JITTER, None, sleep=clock.async_sleep, clock=clock)
    )
    assert result == "ok" and clock.sleeps == pytest.approx([0.1, 0.2])


# ---------------------------------------------------------------- trace context (unit)


def test_no_trace_metadata_without_a_span():
    assert trace_metadata() is None


def test_traceparent_from_the_current_span():
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("call") as span:
        metadata = dict(trace_metadata())
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert metadata["traceparent"].split("-")[1] == trace_id


# ---------------------------------------------------------------- client wiring (fake server on port 0)


class FakeService(pb_grpc.GRPCInferenceServiceServicer):
    """Fails the next calls with the queued codes, and records the metadata it sees."""

    def __init__(self):
        self.failures: list[grpc.StatusCode] = []
        self.metadata: list[dict[str, str]] = []
        self.lock = threading.Lock()

    def _enter(self, context):
        with self.lock:
            self.metadata.append(dict(context.invocation_metadata()))
            failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            context.abort(failure, f"injected {failure.name}")

    def ServerLive(self, request, context):
        self._enter(context)
        return pb.ServerLiveResponse(live=True)

    def ModelInfer(self, request, context):
        self._enter(context)
        if request.id == "block":
            self._block(context)
        return echo_response(request)

    @staticmethod
    def _block(context):
        """Hold the call until the client's deadline (or cancellation) ends it."""
        ended = threading.Event()
        context.add_callback(ended.set)
        ended.wait(BLOCK_LIMIT_S)

    def ModelStreamInfer(self, request_iterator, context):
        self._enter(context)
        for request in request_iterator:
            if request.id == "block":
                self._block(context)
            for index in range(3):
                response = echo_response(request)
                response.parameters["triton_final_response"].bool_param = False
                response.parameters["step"].int64_param = index
                yield pb.ModelStreamInferResponse(infer_response=response)
            final = pb.ModelInferResponse(model_name=request.model_name)
            final.parameters["triton_final_response"].bool_param = True
            yield pb.ModelStreamInferResponse(infer_response=final)


# Bounds a blocked fake call if the client's deadline were ignored.
BLOCK_LIMIT_S = 30.0


@pytest.fixture
def fake_server():
    service = FakeService()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    service.address = f"127.0.0.1:{port}"
    yield service
    server.stop(grace=None)


FAST_RETRIES = RetryPolicy(max_retries=2, initial_backoff=0.001, max_backoff=0.001)


def test_client_retries_unavailable_then_succeeds(fake_server):
    fake_server.failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    with InferenceClient(fake_server.address, retries=FAST_RETRIES, timeout=10) as client:
        assert client.is_server_live() is True
    assert len(fake_server.metadata) == 3


def test_client_gives_up_after_the_retry_budget(fake_server):
    fake_server.failures = [grpc.StatusCode.UNAVAILABLE] * 3
    with InferenceClient(fake_server.address, retries=FAST_RETRIES, timeout=10) as client:
        with pytest.raises(Unavailable, match="injected UNAVAILABLE"):
            client.is_server_live()
    assert len(fake_server.metadata) == 3


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED]
)
def test_client_does_not_retry_other_codes(fake_server, code):
    fake_server.failures = [code]
    with InferenceClient(fake_server.address, retries=FAST_RETRIES, timeout=10) as client:
        with pytest.raises(MeshError) as info:
            client.infer("m", {"X": np.zeros(2, np.float32)})
    assert info.value.code is code and info.value.message == f"injected {code.name}"
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert len(fake_server.metadata) == 1


def test_streams_are_never_retried(fake_server):
    fake_server.failures = [grpc.StatusCode.UNAVAILABLE]
    with InferenceClient(fake_server.address, retries=FAST_RETRIES, timeout=10) as client:
        with pytest.raises(Unavailable):
            list(client.stream("m", {"X": np.array(["a"])}))
    assert len(fake_server.metadata) == 1


def test_stream_yields_until_final_and_skips_the_empty_final(fake_server):
    with InferenceClient(fake_server.address, timeout=10) as client:
        responses = list(client.stream("m", {"X": np.array(["a"])}))
    assert [r["X"].tolist() for r in responses] == [[b"a"]] * 3


def test_async_client_retries_and_streams(fake_server):
    async def main():
        async with AsyncInferenceClient(fake_server.address, retries=FAST_RETRIES, timeout=10) as client:
            fake_server.failures = [grpc.StatusCode.UNAVAILABLE]
            assert await client.is_server_live() is True
            fake_server.failures = [grpc.StatusCode.INVALID_ARGUMENT]
            with pytest.raises(InvalidArgument, match="injected"):
                await client.infer("m", {"X": np.zeros(1, np.int32)})
            fake_server.failures = [grpc.StatusCode.UNAVAILABLE]
            with pytest.raises(Unavailable):
                [r async for r in client.stream("m", {"X": np.array(["a"])})]
            return [r["X"].tolist() async for r in client.stream("m", {"X": np.array(["b"])})]

    assert asyncio.run(main()) == [[b"b"]] * 3
    assert len(fake_server.metadata) == 2 + 1 + 1 + 1


def test_trace_context_travels_as_metadata(fake_server):
    tracer = TracerProvider().get_tracer("test")
    with InferenceClient(fake_server.address, timeout=10) as client:
        client.is_server_live()
        with tracer.start_as_current_span("caller") as span:
            client.infer("m", {"X": np.zeros(1, np.float32)})
            list(client.stream("m", {"X": np.array(["a"])}))
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert "traceparent" not in fake_server.metadata[0]
    assert [m["traceparent"].split("-")[1] for m in fake_server.metadata[1:]] == [trace_id, trace_id]


def test_deadlines_per_call_and_client_default(fake_server):
    inputs = {"X": np.zeros(1, np.float32)}
    with InferenceClient(fake_server.address, timeout=0.2) as client:
        with pytest.raises(DeadlineExceeded):
            client.infer("m", inputs, request_id="block")  # the client's default
        with pytest.raises(DeadlineExceeded):
            client.infer("m", inputs, request_id="block", timeout=0.05)
        with pytest.raises(DeadlineExceeded):
            list(client.stream("m", inputs, request_id="block"))
    with InferenceClient(fake_server.address) as client:
        with pytest.raises(DeadlineExceeded):
            client.infer("m", inputs, request_id="block", timeout=0.1)
    assert len(fake_server.metadata) == 4  # a deadline is never retried

    async def main():
        async with AsyncInferenceClient(fake_server.address, timeout=0.2) as client:
            with pytest.raises(DeadlineExceeded):
                await client.infer("m", inputs, request_id="block")
            with pytest.raises(DeadlineExceeded):
                await client.infer("m", inputs, request_id="block", timeout=0.05)
            with pytest.raises(DeadlineExceeded):
                [r async for r in client.stream("m", inputs, request_id="block")]

    asyncio.run(main())
    assert len(fake_server.metadata) == 7


def test_unreachable_server_is_unavailable():
    # Port 1 on loopback: nothing listens there, the connection is refused at once.
    with InferenceClient("127.0.0.1:1", retries=FAST_RETRIES, timeout=10) as client:
        with pytest.raises(Unavailable):
            client.is_server_ready()


# ---------------------------------------------------------------- against the real runtime (component)

# Generous: the shared runtime may be busy loading models on a small machine;
# it bounds a hung call, it is not a latency claim.
CALL_TIMEOUT_S = 60.0
PROMPT = "The scheduler"


@pytest.fixture(scope="module")
def address(examples_runtime):
    return examples_runtime.address


@pytest.fixture
def client(address):
    with InferenceClient(address, timeout=CALL_TIMEOUT_S) as client:
        yield client


def run_async(client_address, body):
    """Run ``body(async_client)`` on a fresh event loop with its own client."""

    async def main():
        async with AsyncInferenceClient(client_address, timeout=CALL_TIMEOUT_S) as client:
            return await body(client)

    return asyncio.run(main())


def add_sub_inputs(batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "INPUT0": rng.standard_normal((batch, 16), dtype=np.float32),
        "INPUT1": rng.standard_normal((batch, 16), dtype=np.float32),
    }


def check_add_sub(inputs, outputs, names=("OUTPUT0", "OUTPUT1")):
    assert sorted(outputs) == sorted(names)
    expected = {"OUTPUT0": inputs["INPUT0"] + inputs["INPUT1"], "OUTPUT1": inputs["INPUT0"] - inputs["INPUT1"]}
    for name in names:
        assert outputs[name].dtype == np.float32
        np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-6)


def textgen_inputs(prompt: str = PROMPT, max_tokens: int | None = None) -> dict[str, np.ndarray]:
    inputs = {"PROMPT": np.array([prompt])}
    if max_tokens is not None:
        inputs["MAX_TOKENS"] = np.array([max_tokens], dtype=np.int32)
    return inputs


def tokens_of(responses) -> list[bytes]:
    tokens = []
    for response in responses:
        assert list(response) == ["TOKEN"] and response["TOKEN"].shape == (1,)
        tokens.append(response["TOKEN"][0])
    return tokens


@pytest.mark.parametrize("use_raw", [True, False])
def test_runtime_infer_add_sub(client, use_raw):
    inputs = add_sub_inputs()
    check_add_sub(inputs, client.infer("add_sub", inputs, use_raw=use_raw, request_id="req-1"))


def test_runtime_requested_outputs_are_filtered(client):
    inputs = add_sub_inputs(batch=1)
    check_add_sub(inputs, client.infer("add_sub", inputs, ["OUTPUT1"]), names=("OUTPUT1",))


@pytest.mark.parametrize("use_raw", [True, False])
def test_runtime_async_infer_add_sub_concurrently(address, use_raw):
    batches = [add_sub_inputs(batch=1 + i % 3, seed=i) for i in range(8)]

    async def body(client):
        return await asyncio.gather(*(client.infer("add_sub", b, use_raw=use_raw) for b in batches))

    for inputs, outputs in zip(batches, run_async(address, body), strict=True):
        check_add_sub(inputs, outputs)


@pytest.mark.parametrize("use_raw", [True, False])
def test_runtime_echo_bytes_str_and_bytes(client, use_raw):
    text = np.array(["héllo", "", "wörld ✓"])
    out = client.infer("echo_bytes", {"INPUT0": text}, use_raw=use_raw)["OUTPUT0"]
    assert out.tolist() == [s.encode("utf-8") for s in text]
    raw = np.array([b"\x00\xff\xfe", b"", b"plain"], dtype=object)
    assert client.infer("echo_bytes", {"INPUT0": raw}, use_raw=use_raw)["OUTPUT0"].tolist() == raw.tolist()


def test_runtime_stream_textgen_in_order_until_final(client):
    long = tokens_of(client.stream("textgen", textgen_inputs(max_tokens=12)))
    short = tokens_of(client.stream("textgen", textgen_inputs(max_tokens=5)))
    assert len(long) == 12 and short == long[:5]  # seeded by the prompt: a prefix, in order
    assert all(isinstance(token, bytes) and token for token in long)
    default = tokens_of(client.stream("textgen", textgen_inputs()))
    assert len(default) == 32 and default[:12] == long


def test_runtime_stream_with_no_tokens_yields_nothing(client):
    assert list(client.stream("textgen", textgen_inputs(max_tokens=0))) == []


def test_runtime_async_stream_textgen(address, client):
    expected = tokens_of(client.stream("textgen", textgen_inputs(max_tokens=6)))

    async def body(async_client):
        return [r async for r in async_client.stream("textgen", textgen_inputs(max_tokens=6))]

    assert tokens_of(run_async(address, body)) == expected


def test_runtime_breaking_out_of_a_stream_cancels_it(address, client):
    with client.stream("textgen", textgen_inputs(max_tokens=500)) as stream:
        first = next(stream)
    assert stream.cancelled and first["TOKEN"].shape == (1,)
    assert list(stream) == []
    for _ in client.stream("textgen", textgen_inputs(max_tokens=500)):
        break  # dropping the iterator cancels the call

    async def body(async_client):
        async with async_client.stream("textgen", textgen_inputs(max_tokens=500)) as astream:
            async for _ in astream:
                break
        return astream.cancelled

    assert run_async(address, body) is True
    # The runtime serves on after the cancelled streams.
    assert len(tokens_of(client.stream("textgen", textgen_inputs(max_tokens=3)))) == 3


def test_runtime_stream_error_raises_its_taxonomy_error(address, client):
    with pytest.raises(MeshError, match="above the limit") as info:
        list(client.stream("textgen", textgen_inputs(max_tokens=100_000)))
    assert isinstance(info.value, (InvalidArgument, Internal))

    async def body(async_client):
        with pytest.raises(type(info.value), match="above the limit"):
            [r async for r in async_client.stream("textgen", textgen_inputs(max_tokens=100_000))]

    run_async(address, body)


def test_runtime_stream_to_unknown_model_fails_the_stream(client):
    with pytest.raises(MeshError, match="no_such_model"):
        list(client.stream("no_such_model", textgen_inputs()))


def test_runtime_stream_to_unknown_model_raises_not_found(client):
    with pytest.raises(NotFound, match="no_such_model"):
        list(client.stream("no_such_model", textgen_inputs()))


def test_runtime_server_and_model_state(client):
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    assert client.is_model_ready("add_sub") is True
    assert client.health() == "SERVING"
    assert client.server_metadata().name


def test_runtime_model_metadata_and_config(client):
    metadata = client.model_metadata("add_sub")
    assert metadata.name == "add_sub"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("INPUT0", "FP32", [-1, 16]), ("INPUT1", "FP32", [-1, 16])
    ]
    assert [t.name for t in metadata.outputs] == ["OUTPUT0", "OUTPUT1"]
    config = client.model_config("add_sub").config
    assert config.name == "add_sub" and config.max_batch_size == 64
    assert client.model_config("textgen").config.model_transaction_policy.decoupled is True


def test_runtime_statistics_and_repository_index(client):
    client.infer("add_sub", add_sub_inputs(batch=1))
    stats = client.model_statistics("add_sub").model_stats
    assert [s.name for s in stats] == ["add_sub"] and stats[0].inference_count >= 1
    assert "add_sub" in {s.name for s in client.model_statistics().model_stats}
    index = {m.name: m.state for m in client.repository_index().models}
    assert {"add_sub", "echo_bytes", "textgen"} <= set(index)
    assert index["add_sub"] == "READY"
    assert "add_sub" in {m.name for m in client.repository_index(ready=True).models}


def test_runtime_async_server_and_model_state(address):
    async def body(client):
        return (
            await client.is_server_live(), await client.is_server_ready(),
            await client.is_model_ready("echo_bytes"), await client.health(),
            (await client.model_metadata("echo_bytes")).name,
            (await client.model_config("echo_bytes")).config.max_batch_size,
            len((await client.repository_index()).models) >= 3,
            (await client.server_metadata()).name != "",
            isinstance(await client.model_statistics("echo_bytes"), pb.ModelStatisticsResponse),
        )

    assert run_async(address, body) == (True, True, True, "SERVING", "echo_bytes", 0, True, True, True)


def test_runtime_unknown_model_raises_not_found(address, client):
    with pytest.raises(NotFound, match="no_such_model"):
        client.infer("no_such_model", add_sub_inputs())
    with pytest.raises(NotFound, match="no_such_model"):
        client.model_metadata("no_such_model")

    async def body(async_client):
        with pytest.raises(NotFound, match="no_such_model"):
            await async_client.infer("no_such_model", add_sub_inputs())

    run_async(address, body)


def test_runtime_wrong_shape_raises_invalid_argument(address, client):
    bad = {"INPUT0": np.zeros((1, 15), np.float32), "INPUT1": np.zeros((1, 15), np.float32)}
    with pytest.raises(InvalidArgument, match="INPUT0"):
        client.infer("add_sub", bad)
    with pytest.raises(InvalidArgument, match="INPUT0"):
        client.infer("add_sub", {"INPUT0": np.zeros((1, 16), np.float64), "INPUT1": bad["INPUT1"]})

    async def body(async_client):
        with pytest.raises(InvalidArgument, match="INPUT0"):
            await async_client.infer("add_sub", bad)

    run_async(address, body)


def test_runtime_timeouts(address, client):
    # 512 tokens take the runtime 100+ ms to generate; 10 ms cannot hold them.
    with pytest.raises(DeadlineExceeded):
        tokens_of(client.stream("textgen", textgen_inputs(max_tokens=512), timeout=0.01))
    with InferenceClient(address, timeout=1e-6) as hasty:
        assert hasty.is_server_live(timeout=CALL_TIMEOUT_S) is True  # the call's timeout wins

    async def body(async_client):
        with pytest.raises(DeadlineExceeded):
            [r async for r in async_client.stream("textgen", textgen_inputs(max_tokens=512), timeout=0.01)]

    run_async(address, body)
    # The runtime serves on after the expired calls.
    assert len(tokens_of(client.stream("textgen", textgen_inputs(max_tokens=3)))) == 3


def test_runtime_unload_and_load(start_runtime):
    runtime = start_runtime("--model-repository", EXAMPLES, "--model", "echo_bytes", "--model-control", "explicit")
    inputs = {"INPUT0": np.array([b"x"], dtype=object)}
    with InferenceClient(runtime.address, timeout=CALL_TIMEOUT_S) as client:
        assert client.is_model_ready("echo_bytes") is True
        client.unload_model("echo_bytes")
        assert client.is_model_ready("echo_bytes") is False
        with pytest.raises(Unavailable, match="echo_bytes"):  # retried, then given up
            client.infer("echo_bytes", inputs)
        with pytest.raises(NotFound, match="echo_bytes"):
            client.unload_model("echo_bytes")
        client.load_model("echo_bytes")
        assert client.infer("echo_bytes", inputs)["OUTPUT0"].tolist() == [b"x"]
        with pytest.raises(FailedPrecondition, match="no_such_model"):  # not one it was started with
            client.load_model("no_such_model")

    async def body(async_client):
        await async_client.unload_model("echo_bytes")
        ready = await async_client.is_model_ready("echo_bytes")
        await async_client.load_model("echo_bytes")
        return ready, await async_client.is_model_ready("echo_bytes")

    assert run_async(runtime.address, body) == (False, True)


def test_runtime_mlp_onnx(client):
    pytest.importorskip("onnxruntime")
    assert client.is_model_ready("mlp_onnx")
    spec = importlib.util.spec_from_file_location("mlp_onnx_build", EXAMPLES / "mlp_onnx" / "build.py")
    build = importlib.util.module_from_spec(spec)
    previous, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # keep the repository clean
    try:
        spec.loader.exec_module(build)
    finally:
        sys.dont_write_bytecode = previous
    x = np.random.default_rng(1).standard_normal((3, 8), dtype=np.float32)
    out = client.infer("mlp_onnx", {"INPUT": x})["OUTPUT"]
    assert out.shape == (3, 4)
    np.testing.assert_allclose(out, build.reference_forward(x), rtol=1e-5, atol=1e-5)
