"""Unit tests of the proxy's pure parts: the wire scanner, the balancer, the retry budget,
statistics aggregation and the metrics text format. No servers, no sleeping."""

from __future__ import annotations

import random

import pytest

from meshserve.common.errors import InvalidArgument
from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.proxy.balancer import Balancer
from meshserve.proxy.metrics import ProxyMetrics
from meshserve.proxy.retry_budget import RetryBudget
from meshserve.proxy.routes import EndpointInfo, Route, RouteTable
from meshserve.proxy.statistics import aggregate
from meshserve.proxy.wire import scan_request

# -- wire scanner ----------------------------------------------------------------------------


def _infer_request(**fields) -> bytes:
    request = pb.ModelInferRequest(**fields)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(b"\x00" * 64)
    request.parameters["sequence_id"].int64_param = 7
    return request.SerializeToString()


def test_scanner_reads_name_version_and_id_of_a_full_request():
    data = _infer_request(model_name="add_sub", model_version="3", id="req-1")
    assert scan_request(data, with_id=True) == ("add_sub", "3", "req-1")
    assert scan_request(data) == ("add_sub", "3", "")


def test_scanner_matches_protobuf_for_other_model_scoped_requests():
    for message in (pb.ModelConfigRequest(name="m", version="2"), pb.ModelMetadataRequest(name="m", version="2"),
                    pb.ModelStatisticsRequest(name="m", version="2"), pb.ModelReadyRequest(name="m", version="2")):
        assert scan_request(message.SerializeToString()) == ("m", "2", "")


def test_scanner_skips_large_tensors_and_finds_fields_after_them():
    tensors = pb.ModelInferRequest(raw_input_contents=[b"x" * 1_000_000]).SerializeToString()
    name = pb.ModelInferRequest(model_name="late").SerializeToString()
    assert scan_request(tensors + name).model == "late"   # concatenation = merge: fields after tensors count


def test_scanner_last_occurrence_wins_like_protobuf():
    data = pb.ModelInferRequest(model_name="first").SerializeToString() + \
        pb.ModelInferRequest(model_name="second").SerializeToString()
    assert scan_request(data).model == pb.ModelInferRequest.FromString(data).model_name == "second"


def test_scanner_empty_message_names_nothing():
    assert scan_request(b"") == ("", "", "")


def test_scanner_skips_fixed_width_and_varint_fields():
    # field 9 varint 300, field 10 fixed64, field 11 fixed32, then model_name
    data = bytes([9 << 3 | 0, 0xAC, 0x02, 10 << 3 | 1, *b"12345678", 11 << 3 | 5, *b"1234", 0x0A, 1, ord("m")])
    assert scan_request(data).model == "m"


@pytest.mark.parametrize("data, fragment", [
    (b"\x0a", "truncated varint"),                       # key, then no length
    (b"\x0a\x05abc", "runs past the end"),               # length 5, 3 bytes
    (b"\x0a\xff", "truncated varint"),                   # length varint cut off
    (b"\x80" * 11, "longer than 10 bytes"),
    (b"\x00\x01", "field number 0"),
    (b"\x0b", "wire type 3"),                            # group start
    (b"\x0f", "wire type 7"),
    (b"\x08\x01", "not a string"),                       # model_name as a varint
    (b"\x0a\x02\xff\xfe", "not valid UTF-8"),
    (b"\x49" + b"1234", "runs past the end"),            # fixed64 with 4 bytes
])
def test_scanner_refuses_malformed_input_with_invalid_argument(data, fragment):
    with pytest.raises(InvalidArgument) as info:
        scan_request(data)
    assert fragment in info.value.message


def test_scanner_never_raises_anything_but_invalid_argument_on_random_bytes():
    rng = random.Random(1)
    for _ in range(2000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 24)))
        try:
            scan_request(data, with_id=True)
        except InvalidArgument:
            pass


# -- balancer --------------------------------------------------------------------------------


class _Endpoint:
    def __init__(self, address: str):
        self.address = address
        self.info = EndpointInfo(address, address, "n")
        self.outstanding = 0
        self.healthy = True


class _Pool:
    def __init__(self, *addresses: str):
        self.endpoints = {a: _Endpoint(a) for a in addresses}

    def get(self, address):
        return self.endpoints.get(address)


def _route(*addresses: str, weight: int = 100, deployment: str = "d") -> Route:
    return Route("m", "", deployment, 1, weight, tuple(EndpointInfo(a, a, "n") for a in addresses))


def test_least_of_two_never_picks_the_busiest_of_three():
    pool = _Pool("a", "b", "c")
    pool.endpoints["c"].outstanding = 10
    balancer = Balancer(random.Random(0))
    picks = [balancer.pick([_route("a", "b", "c")], pool).address for _ in range(300)]
    assert "c" not in picks  # of any two drawn, the other one is less busy
    assert picks.count("a") > 100 and picks.count("b") > 100


def test_weights_split_between_routes():
    pool = _Pool("a", "b")
    balancer = Balancer(random.Random(0))
    routes = [_route("a", weight=90, deployment="v1"), _route("b", weight=10, deployment="v2")]
    picks = [balancer.pick(routes, pool).address for _ in range(10_000)]
    assert 800 <= picks.count("b") <= 1200


def test_out_of_rotation_and_tried_replicas_are_avoided_and_used_only_as_a_last_resort():
    pool = _Pool("a", "b")
    pool.endpoints["a"].healthy = False
    balancer = Balancer(random.Random(0))
    assert {balancer.pick([_route("a", "b")], pool).address for _ in range(50)} == {"b"}
    assert balancer.pick([_route("a", "b")], pool, exclude={"b"}).address == "a"  # nothing else left
    assert balancer.pick([_route("a", "b")], pool, exclude={"a", "b"}) is None


def test_a_route_with_no_replica_left_gives_its_share_to_the_others():
    pool = _Pool("a", "b")
    pool.endpoints["b"].healthy = False
    balancer = Balancer(random.Random(0))
    routes = [_route("a", weight=10, deployment="v1"), _route("b", weight=90, deployment="v2")]
    assert {balancer.pick(routes, pool).address for _ in range(100)} == {"a"}


def test_route_table_versions():
    table = RouteTable([Route("m", "", "d", 1, 100, ()), Route("m", "2", "d2", 1, 100, ())])
    assert [r.deployment for r in table.routes_for("m", "2")] == ["d2"]
    assert [r.deployment for r in table.routes_for("m", "7")] == ["d"]   # unversioned route: the replica answers
    assert len(table.routes_for("m")) == 2 and table.routes_for("x") == []


# -- retry budget ----------------------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_retry_budget_floor_then_ratio_then_window_expiry():
    clock = _Clock()
    budget = RetryBudget(ratio=0.2, min_per_window=3, window_s=10.0, clock=clock)
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]   # floor of 3
    for _ in range(100):
        budget.record_call()
    spent = sum(budget.try_spend() for _ in range(50))
    assert spent == 17  # 20 % of 100 calls = 20 retries in the window, 3 already spent
    clock.now += 10.0
    assert budget.try_spend()  # the window moved on


# -- statistics ------------------------------------------------------------------------------


def _stats(count: int, ns: int, last: int, batch: int) -> pb.ModelStatisticsResponse:
    stats = pb.ModelStatistics(name="m", version="1", last_inference=last, inference_count=count,
                               execution_count=count)
    stats.inference_stats.success.count = count
    stats.inference_stats.success.ns = ns
    stats.batch_stats.add(batch_size=batch).compute_infer.count = count
    stats.response_stats["0"].success.count = count
    return pb.ModelStatisticsResponse(model_stats=[stats])


def test_statistics_sum_counts_and_ns_take_the_latest_inference_and_merge_batch_sizes():
    merged = aggregate([_stats(2, 100, 5, 1), _stats(3, 1000, 9, 1), _stats(1, 10, 7, 4)]).model_stats
    assert len(merged) == 1
    stats = merged[0]
    assert (stats.name, stats.version, stats.last_inference) == ("m", "1", 9)
    assert stats.inference_count == stats.execution_count == 6
    assert (stats.inference_stats.success.count, stats.inference_stats.success.ns) == (6, 1110)
    assert {b.batch_size: b.compute_infer.count for b in stats.batch_stats} == {1: 5, 4: 1}
    assert stats.response_stats["0"].success.count == 6


# -- metrics text ----------------------------------------------------------------------------


def test_metrics_use_tritons_names_without_suffixes_and_escape_labels():
    metrics = ProxyMetrics()
    metrics.success.labels("m", "1", 'r"1').inc()
    metrics.latency.labels("m", "1").observe(0.003)
    text = metrics.render()
    assert "# TYPE nv_inference_request_success counter" in text
    assert 'nv_inference_request_success{model="m",version="1",replica="r\\"1"} 1' in text
    assert 'meshserve_proxy_request_duration_seconds_bucket{model="m",version="1",le="0.0025"} 0' in text
    assert 'meshserve_proxy_request_duration_seconds_bucket{model="m",version="1",le="0.005"} 1' in text
    assert 'meshserve_proxy_request_duration_seconds_bucket{model="m",version="1",le="+Inf"} 1' in text
    assert 'meshserve_proxy_request_duration_seconds_count{model="m",version="1"} 1' in text
