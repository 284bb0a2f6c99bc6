"""Model lifecycle (RepositoryModelLoad/Unload) and the replica's drain on SIGTERM.

Each test runs its own runtime (they unload models or stop the process).
"""

from __future__ import annotations

import signal

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_runtime_helpers import (
    EXAMPLES,
    RPC_TIMEOUT_S,
    SERVING,
    assert_status,
    check_add_sub,
    decode_outputs,
    infer_request,
    open_stub,
    rpc_error,
    wait_executing,
    wait_until,
)

from meshserve.protos.inference import grpc_service_pb2 as pb

# Long enough that SIGTERM lands while both requests still run; the test does not
# depend on it (the requests must succeed whenever SIGTERM lands).
SLOW_REQUEST_MS = 1500
# The drain must finish well inside this; the grace period itself is the runtime's default.
EXIT_TIMEOUT_S = 30.0
# What a new RPC gets from a stopping gRPC server, depending on when it lands.
REFUSED_WHILE_STOPPING = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def _index(stub) -> dict[str, pb.RepositoryIndexResponse.ModelIndex]:
    response = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=RPC_TIMEOUT_S)
    return {model.name: model for model in response.models}


def _ready(stub, name: str) -> bool:
    return stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=RPC_TIMEOUT_S).ready


def _sleep_request(delay_ms: int, request_id: str = "") -> pb.ModelInferRequest:
    return infer_request("sleeper", {"DELAY_MS": np.array([delay_ms], np.int32)}, request_id=request_id)


def test_unload_then_load_again(start_runtime):
    runtime = start_runtime("--model-repository", EXAMPLES, "--model", "add_sub", "--model-control", "explicit")
    channel, stub = open_stub(runtime.address)
    with channel:
        check_add_sub(stub)
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="add_sub"), timeout=RPC_TIMEOUT_S)
        assert not _ready(stub, "add_sub")
        row = _index(stub)["add_sub"]
        assert (row.state, row.reason) == ("UNAVAILABLE", "unloaded")
        error = rpc_error(stub.ModelInfer, infer_request("add_sub", {
            "INPUT0": np.zeros((1, 16), np.float32), "INPUT1": np.zeros((1, 16), np.float32)}))
        assert_status(error, grpc.StatusCode.UNAVAILABLE, "add_sub", "not ready")
        error = rpc_error(stub.ModelMetadata, pb.ModelMetadataRequest(name="add_sub"))
        assert_status(error, grpc.StatusCode.UNAVAILABLE, "add_sub")
        error = rpc_error(stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="add_sub"))
        assert_status(error, grpc.StatusCode.NOT_FOUND, "add_sub", "not loaded")

        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="add_sub"), timeout=RPC_TIMEOUT_S)
        assert _ready(stub, "add_sub")
        assert _index(stub)["add_sub"].state == "READY"
        check_add_sub(stub, batch=4, seed=1)


def test_load_a_model_not_loaded_at_startup_and_reload_a_loaded_one(start_runtime):
    runtime = start_runtime("--model-repository", EXAMPLES, "--model", "add_sub", "--model", "echo_bytes",
                            "--model-control", "explicit")
    channel, stub = open_stub(runtime.address)
    with channel:
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="echo_bytes"), timeout=RPC_TIMEOUT_S)
        assert not _ready(stub, "echo_bytes")
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="echo_bytes"), timeout=RPC_TIMEOUT_S)
        assert _ready(stub, "echo_bytes")
        items = np.array([b"loaded", b"later"], dtype=object)
        response = stub.ModelInfer(infer_request("echo_bytes", {"INPUT0": items}, datatypes={"INPUT0": "BYTES"}),
                                   timeout=RPC_TIMEOUT_S)
        np.testing.assert_array_equal(decode_outputs(response)["OUTPUT0"], items)
        # Loading a loaded model swaps in a new copy; it keeps serving.
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="add_sub"), timeout=RPC_TIMEOUT_S)
        assert _ready(stub, "add_sub")
        check_add_sub(stub, batch=2, seed=2)


def test_load_requests_that_cannot_be_served_are_refused(start_runtime):
    runtime = start_runtime("--model-repository", EXAMPLES, "--model", "add_sub", "--model", "ghost",
                            "--model", "no_such_model", "--model-control", "explicit")
    channel, stub = open_stub(runtime.address)
    with channel:
        ghost = _index(stub)["ghost"]  # named with --model, but no such folder
        assert ghost.state == "UNAVAILABLE" and "no folder" in ghost.reason and "ghost" in ghost.reason
        assert not _ready(stub, "ghost")
        error = rpc_error(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="ghost"))
        assert_status(error, grpc.StatusCode.NOT_FOUND, "ghost")
        error = rpc_error(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="no_such_model"))
        assert_status(error, grpc.StatusCode.NOT_FOUND, "no_such_model")
        error = rpc_error(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="../add_sub"))
        assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "../add_sub")
        request = pb.RepositoryModelLoadRequest(model_name="add_sub")
        request.parameters["config"].string_param = "{}"
        error = rpc_error(stub.RepositoryModelLoad, request)
        assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "config")
        error = rpc_error(stub.RepositoryModelUnload,
                          pb.RepositoryModelUnloadRequest(model_name="add_sub", repository_name="other"))
        assert_status(error, grpc.StatusCode.NOT_FOUND, "other")
        check_add_sub(stub)


def test_unload_lets_in_flight_requests_finish(start_runtime):
    runtime = start_runtime("--model-repository", SERVING, "--model", "sleeper", "--model-control", "explicit")
    channel, stub = open_stub(runtime.address)
    with channel:
        running = stub.ModelInfer.future(_sleep_request(SLOW_REQUEST_MS // 3, "running"), timeout=RPC_TIMEOUT_S)
        wait_executing(stub, "sleeper", 0)
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="sleeper"), timeout=RPC_TIMEOUT_S)
        response = running.result(timeout=RPC_TIMEOUT_S)  # drained, not cancelled
        assert response.id == "running"
        assert decode_outputs(response)["DONE_MS"].tolist() == [SLOW_REQUEST_MS // 3]
        error = rpc_error(stub.ModelInfer, _sleep_request(0))
        assert_status(error, grpc.StatusCode.UNAVAILABLE, "sleeper")


def test_sigterm_drains_in_flight_requests_and_exits_zero(start_runtime):
    runtime = start_runtime("--model-repository", SERVING, "--model", "sleeper")
    channel, stub = open_stub(runtime.address)
    health = health_pb2_grpc.HealthStub(channel)
    with channel:
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=RPC_TIMEOUT_S).ready
        check = health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        # Two requests, both executing (sleeper has two instances) when SIGTERM arrives.
        calls = [stub.ModelInfer.future(_sleep_request(SLOW_REQUEST_MS, f"inflight-{i}"), timeout=RPC_TIMEOUT_S)
                 for i in range(2)]
        wait_executing(stub, "sleeper", 0, count=2)
        runtime.proc.send_signal(signal.SIGTERM)

        def not_ready() -> bool:
            # Draining: ServerReady says false, or the server no longer takes new RPCs
            # (refused, or cancelled when it raced the stop); it never says ready again.
            try:
                return not stub.ServerReady(pb.ServerReadyRequest(), timeout=RPC_TIMEOUT_S).ready
            except grpc.RpcError as error:
                assert error.code() in REFUSED_WHILE_STOPPING, error
                return True

        wait_until(not_ready, "ServerReady to stop answering ready after SIGTERM")
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        except grpc.RpcError as error:
            assert error.code() in REFUSED_WHILE_STOPPING, error

        for index, call in enumerate(calls):
            response = call.result(timeout=RPC_TIMEOUT_S)
            assert response.id == f"inflight-{index}"
            assert decode_outputs(response)["DONE_MS"].tolist() == [SLOW_REQUEST_MS]
    assert runtime.proc.wait(EXIT_TIMEOUT_S) == 0
    assert any("draining" in line for line in runtime.output)


def test_health_watch_sees_serving_then_not_serving_on_sigterm(start_runtime):
    runtime = start_runtime("--model-repository", SERVING, "--model", "sleeper")
    channel, _ = open_stub(runtime.address)
    with channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT_S)
        try:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            runtime.proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            watch.cancel()
    assert runtime.proc.wait(EXIT_TIMEOUT_S) == 0


def _version_of(stub, model: str, version: str = "") -> int:
    response = stub.ModelInfer(infer_request(model, {"X": np.array([0], np.int32)}, version=version),
                               timeout=RPC_TIMEOUT_S)
    assert response.model_version == (version or response.model_version)
    return int(decode_outputs(response)["VERSION"][0])


def test_version_policies(start_runtime):
    runtime = start_runtime("--model-repository", SERVING, "--model", "versioned", "--model", "latest_only")
    channel, stub = open_stub(runtime.address)
    with channel:
        # version_policy all: both served; no version means the latest.
        assert [_version_of(stub, "versioned", v) for v in ("1", "2", "")] == [101, 202, 202]
        metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="versioned"), timeout=RPC_TIMEOUT_S)
        assert sorted(metadata.versions) == ["1", "2"]
        rows = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=RPC_TIMEOUT_S).models
        assert sorted((m.version, m.state) for m in rows if m.name == "versioned") == [("1", "READY"), ("2", "READY")]
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="versioned", version="1"), timeout=RPC_TIMEOUT_S)
        assert [(s.version, s.inference_count) for s in stats.model_stats] == [("1", 1)]

        # Default policy: only the latest version is served.
        assert _version_of(stub, "latest_only") == 202
        assert stub.ModelReady(pb.ModelReadyRequest(name="latest_only", version="2"), timeout=RPC_TIMEOUT_S).ready
        assert not stub.ModelReady(pb.ModelReadyRequest(name="latest_only", version="1"), timeout=RPC_TIMEOUT_S).ready
        error = rpc_error(stub.ModelInfer, infer_request("latest_only", {"X": np.array([0], np.int32)}, version="1"))
        assert_status(error, grpc.StatusCode.NOT_FOUND, "latest_only", "'1'")


def test_drain_delay_reports_not_serving_while_still_serving(start_runtime):
    """With --drain-delay, health checkers see NOT_SERVING before the port closes, and calls still work."""
    # Long enough for the checks below on a loaded machine; the test waits on the process, not on this.
    process = start_runtime("--model-repository", EXAMPLES, "--model", "add_sub", "--drain-delay", "20")
    channel, stub = open_stub(process.address)
    health = health_pb2_grpc.HealthStub(channel)
    check_add_sub(stub)
    process.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: not stub.ServerReady(pb.ServerReadyRequest(), timeout=RPC_TIMEOUT_S).ready,
               "ServerReady to turn false")
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    check_add_sub(stub)  # still served during the delay
    channel.close()
    process.proc.kill()  # the delay itself is not under test
    process.proc.wait(EXIT_TIMEOUT_S)


def test_the_plain_asyncio_event_loop_serves_and_drains(start_runtime):
    process = start_runtime("--model-repository", EXAMPLES, "--model", "add_sub", "--event-loop", "asyncio")
    channel, stub = open_stub(process.address)
    check_add_sub(stub, batch=3)
    channel.close()
    assert process.stop() == 0


# Far longer than any drain here takes: a runtime that waits out its grace period fails these tests.
LONG_GRACE_S = 120


def test_a_health_watch_does_not_hold_a_draining_replica_for_its_grace_period(start_runtime):
    """The grace period is a ceiling, not a wait: an idle replica whose health a proxy watches stops at once,
    and one with a request in flight stops right after it answers (issue 12's fast drain)."""
    runtime = start_runtime("--model-repository", SERVING, "--model", "sleeper",
                            "--grace-period", str(LONG_GRACE_S))
    channel, stub = open_stub(runtime.address)
    with channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                          timeout=LONG_GRACE_S)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        running = stub.ModelInfer.future(_sleep_request(SLOW_REQUEST_MS, "last"), timeout=RPC_TIMEOUT_S)
        wait_executing(stub, "sleeper", 0)
        runtime.proc.send_signal(signal.SIGTERM)
        assert running.result(timeout=RPC_TIMEOUT_S).id == "last"   # finished, not cut off
        assert runtime.proc.wait(EXIT_TIMEOUT_S) == 0                # and then out, the watch still open
        watch.cancel()
