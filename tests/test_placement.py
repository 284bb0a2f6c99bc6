"""The placement pipeline end to end on fake node lists: pure functions, no I/O, no sleeping."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from test_placement_fakes import node, overcommitted, random_cluster, random_requests, req

from meshserve.scheduler.placement import (
    GiB,
    MiB,
    Placement,
    ReplicaRequest,
    Snapshot,
    Unschedulable,
    explain,
    explain_lines,
    format_bytes,
    place,
    place_gang,
    summary,
)


def placed_on(results) -> list[str]:
    assert all(isinstance(r, Placement) for r in results), [explain(r) for r in results]
    return [r.node for r in results]


# -- the data model --------------------------------------------------------------------------

def test_format_bytes_reads_like_a_person_writes():
    assert [format_bytes(n) for n in (40 * GiB, 3 * GiB // 2, 512 * MiB, 100, -2 * GiB, 0)] == [
        "40 GiB", "1.5 GiB", "512 MiB", "100 B", "-2 GiB", "0 B"]


def test_request_rejects_an_unknown_strategy_and_negative_sizes():
    with pytest.raises(ValueError, match="strategy"):
        req("r", strategy="random")
    with pytest.raises(ValueError, match="negative"):
        ReplicaRequest("r", "d", gpus=-1)


def test_gpu_view_available_is_free_less_reserved():
    gpu = node("a", [60], reserved_gib=[25]).gpus[0]
    assert gpu.available == 35 * GiB


# -- GPU memory is the currency ----------------------------------------------------------------

def test_reserved_memory_is_not_available_and_placing_reserves_more():
    snap = Snapshot.from_nodes([node("a", [80, 80], reserved_gib=[50, 0])])
    results = place(snap, [req("r1", gib=30), req("r2", gib=30), req("r3", gib=30), req("r4", gib=30)])
    assert [r.gpu_indices for r in results[:3]] == [(1,), (1,), (0,)]   # spread: most available first
    assert isinstance(results[3], Unschedulable)
    gpus = snap.node("a").gpus
    assert [(g.memory_free, g.reserved, g.available) for g in gpus] == [
        (80 * GiB, 80 * GiB, 0), (80 * GiB, 60 * GiB, 20 * GiB)]
    assert results[3].rejected == {"a": "needs 30 GiB available on one GPU; the most available is 20 GiB "
                                         "on GPU 1 (80 GiB free less 60 GiB reserved)"}


@pytest.mark.parametrize("seed", range(6))
def test_a_batch_never_overcommits_anything(seed):
    views = random_cluster(seed)
    requests = random_requests(seed, 300)
    results = place(Snapshot.from_nodes(views), requests)
    assert overcommitted(views, requests, results) == []
    assert any(isinstance(r, Placement) for r in results) and any(isinstance(r, Unschedulable) for r in results)


def test_placement_keeps_host_cpu_and_memory_in_step():
    snap = Snapshot.from_nodes([node("a", [80] * 4, cpu=3, memory_gib=10)])
    results = place(snap, [req(f"r{i}", gib=1, cpu=1, memory_gib=3) for i in range(4)])
    assert [isinstance(r, Placement) for r in results] == [True, True, True, False]
    assert results[3].reasons == "no node: 1 node lacks 1 CPU free"
    assert snap.node("a").cpu_free == 0 and snap.node("a").memory_free == 1 * GiB


# -- spread, pack, selectors, node state -------------------------------------------------------

def test_spread_puts_a_deployments_replicas_on_every_host_before_any_twice():
    snap = Snapshot.from_nodes([node(name, [80] * 4) for name in ("a", "b", "c")])
    results = place(snap, [req(f"r{i}", "web", gib=10) for i in range(6)])
    assert Counter(placed_on(results)) == {"a": 2, "b": 2, "c": 2}
    assert placed_on(results)[:3] == ["a", "b", "c"]


def test_spread_counts_replicas_the_nodes_already_report():
    snap = Snapshot.from_nodes([node("a", replicas={"web": 2}), node("b", replicas={"web": 1}), node("c")])
    assert placed_on(place(snap, [req("r1", "web"), req("r2", "web")])) == ["c", "b"]


def test_pack_fills_the_fullest_node_and_the_tightest_gpu():
    snap = Snapshot.from_nodes([node("a", [80, 80]), node("b", [80, 30]), node("c", [80, 80])])
    results = place(snap, [req(f"r{i}", "batch", gib=20, strategy="pack") for i in range(4)])
    assert placed_on(results) == ["b", "b", "b", "b"]
    assert [r.gpu_indices for r in results] == [(1,), (0,), (0,), (0,)]   # 30 GiB GPU first: best fit


def test_pack_and_spread_part_ways_on_the_same_cluster():
    nodes = [node("a", [80, 80]), node("b", [40, 80])]
    assert placed_on(place(Snapshot.from_nodes(nodes), [req("r", gib=10, strategy="pack")])) == ["b"]
    assert placed_on(place(Snapshot.from_nodes(nodes), [req("r", gib=10, strategy="spread")])) == ["a"]


def test_node_selector_limits_where_replicas_go():
    snap = Snapshot.from_nodes([node("a", labels={"gpu": "a100"}), node("b", labels={"gpu": "h100"}),
                                node("c", labels={"gpu": "h100", "zone": "x"})])
    results = place(snap, [req(f"r{i}", gib=1, selector={"gpu": "h100"}) for i in range(4)])
    assert set(placed_on(results)) == {"b", "c"}
    missing = place(snap, [req("r", selector={"gpu": "b200"})])[0]
    assert missing.reasons == "no node: 3 nodes do not match selector gpu=b200"


def test_cordoned_and_lost_nodes_are_excluded_with_their_reasons():
    snap = Snapshot.from_nodes([node("a", [80], cordoned=True), node("b", [80], ready=False),
                                node("c", [80], ready=False)])
    result = place(snap, [req("r")])[0]
    assert result.reasons == "no node: 2 nodes not ready; 1 node cordoned"
    assert dict(result.rejected) == {"a": "cordoned", "b": "not ready (lost, or not reporting yet)",
                                     "c": "not ready (lost, or not reporting yet)"}
    uncordoned = Snapshot.from_nodes([node("a", [80]), node("b", [80], ready=False)])
    assert placed_on(place(uncordoned, [req("r")])) == ["a"]
    lost = Snapshot.from_nodes([node(name, [80], ready=False) for name in "abc"])
    assert place(lost, [req("r")])[0].reasons == "no node: 3 nodes not ready"


# -- unschedulable: reasons as data ------------------------------------------------------------

def test_unschedulable_summarises_each_filter_like_the_design_says():
    snap = Snapshot.from_nodes([node("node-a", [30, 20]), node("node-b", [39]), node("node-c", [80], reserved_gib=[60]),
                                node("node-d", [80], cordoned=True)])
    result = place(snap, [req("big-0", "big", gib=40)])[0]
    assert isinstance(result, Unschedulable)
    assert result.replica_id == "big-0"
    assert result.reasons == "no node: 3 nodes lack 40 GiB free on one GPU; 1 node cordoned"
    assert result.counts == (("lack 40 GiB free on one GPU", 3), ("cordoned", 1))
    assert list(result.rejected) == ["node-a", "node-b", "node-c", "node-d"]
    assert result.rejected["node-c"] == ("needs 40 GiB available on one GPU; the most available is "
                                         "20 GiB on GPU 0 (80 GiB free less 60 GiB reserved)")
    assert explain(result).splitlines() == [
        "big-0: no node: 3 nodes lack 40 GiB free on one GPU; 1 node cordoned",
        "  node-a: needs 40 GiB available on one GPU; the most available is 30 GiB on GPU 0",
        "  node-b: needs 40 GiB available on one GPU; the most available is 39 GiB on GPU 0",
        "  node-c: needs 40 GiB available on one GPU; the most available is 20 GiB on GPU 0 "
        "(80 GiB free less 60 GiB reserved)",
        "  node-d: cordoned"]


def test_unschedulable_charges_each_node_to_the_first_filter_and_agrees_in_number():
    snap = Snapshot.from_nodes([node("a", [10], cordoned=True), node("b", [10], labels={"zone": "x"}),
                                node("c", [10], labels={"zone": "y"}, cpu=0.5)])
    result = place(snap, [req("r", gib=512 / 1024, cpu=1, selector={"zone": "y"})])[0]
    assert result.reasons == ("no node: 1 node cordoned; 1 node does not match selector zone=y; "
                              "1 node lacks 1 CPU free")


def test_unschedulable_detail_is_what_the_nodes_were_when_it_was_decided():
    snap = Snapshot.from_nodes([node("a", [30])])
    result = place(snap, [req("r", gib=40)])[0]
    snap.reserve(0, (0,), req("later", gib=20))             # a later placement books memory there
    assert result.rejected["a"] == "needs 40 GiB available on one GPU; the most available is 30 GiB on GPU 0"


def test_an_empty_cluster_says_so():
    assert place(Snapshot.from_nodes([]), [req("r")])[0].reasons == "no node: the cluster has no nodes"


def test_cpu_only_nodes_take_cpu_replicas_and_explain_gpu_ones():
    snap = Snapshot.from_nodes([node("a", []), node("b", [])])
    assert placed_on(place(snap, [req("cpu", gpus=0)])) == ["a"]
    result = place(snap, [req("r", gib=1)])[0]
    assert result.reasons == "no node: 2 nodes lack 1 GiB free on one GPU"
    assert result.rejected == {"a": "has 0 GPUs, needs 1", "b": "has 0 GPUs, needs 1"}


# -- multi-GPU ---------------------------------------------------------------------------------

def test_a_multi_gpu_replica_gets_distinct_gpus_on_one_node():
    snap = Snapshot.from_nodes([node("a", [80, 10, 80, 10]), node("b", [50, 10])])
    result = place(snap, [req("r", gpus=2, gib=40)])[0]
    assert (result.node, result.gpu_indices) == ("a", (0, 2))
    # 40 GiB left on a's GPUs 0 and 2 and 50 on b's GPU 0: three such GPUs, but no node has two
    late = place(snap, [req("r2", gpus=2, gib=45)])[0]
    assert late.reasons == "no node: 2 nodes lack 45 GiB free on each of 2 GPUs"
    assert late.rejected["b"] == ("needs 45 GiB available on each of 2 GPUs; 1 has it "
                                  "(the most available is 50 GiB on GPU 0)")


# -- gangs -----------------------------------------------------------------------------------

def stages(*gibs, cpu=1):
    return [req(f"stage{i}", f"pipe-stage{i}", gib=gib, cpu=cpu) for i, gib in enumerate(gibs)]


def test_a_gang_lands_on_one_node_and_one_gpu_where_it_fits():
    snap = Snapshot.from_nodes([node("a", [30, 30]), node("b", [80, 10])])
    results = place_gang(snap, stages(20, 30, 10))
    assert [(r.node, r.gpu_indices) for r in results] == [("b", (0,))] * 3
    assert "gang of 3 (stage0, stage1, stage2) on one node, all or nothing" in explain(results[0])
    assert snap.node("b").gpus[0].reserved == 60 * GiB


def test_a_gang_may_share_a_node_across_gpus():
    snap = Snapshot.from_nodes([node("a", [40, 40])])
    results = place_gang(snap, stages(30, 30))
    assert sorted(r.gpu_indices for r in results) == [(0,), (1,)]


def test_a_gang_that_fits_nowhere_books_nothing():
    # each stage fits a node alone, the pair fits none together
    views = [node("a", [50]), node("b", [45, 20], cpu=1), node("c", [80], cordoned=True)]
    snap = Snapshot.from_nodes(views)
    before = [snap.node(name) for name in snap.names]
    result = place_gang(snap, stages(40, 20))
    assert isinstance(result, Unschedulable)
    assert result.reasons == "no node for gang stage0, stage1: 2 nodes cannot hold all 2 together; 1 node cordoned"
    assert result.rejected == {"a": "its GPUs cannot hold the gang's GPU memory together (1x40 GiB + 1x20 GiB)",
                               "b": "the gang needs 2 CPUs together, 1 free",
                               "c": "stage0: cordoned"}
    assert [snap.node(name) for name in snap.names] == before


def test_a_gang_member_that_fits_nowhere_alone_is_named():
    snap = Snapshot.from_nodes([node("a", [50]), node("b", [65])])
    result = place_gang(snap, stages(10, 60))
    assert result.reasons == "no node for gang stage0, stage1: 1 node lacks 60 GiB free on one GPU; " \
                             "1 node cannot hold all 2 together"
    assert result.rejected["a"] == "stage1: needs 60 GiB available on one GPU; the most available is 50 GiB on GPU 0"
    assert place_gang(snap, []) == []


def test_gang_members_never_overcommit_over_many_gangs():
    views = random_cluster(7)
    snap = Snapshot.from_nodes(views)
    requests, results = [], []
    pool = random_requests(7, 120)
    for start in range(0, len(pool), 3):
        group = pool[start:start + 3]
        got = place_gang(snap, group)
        if isinstance(got, list):
            assert len({p.node for p in got}) == 1
            requests += group
            results += got
    assert results and overcommitted(views, requests, results) == []


# -- decisions and determinism -----------------------------------------------------------------

def test_a_decision_explains_the_score_of_each_plugin():
    snap = Snapshot.from_nodes([node("node-a", [20]), node("node-b", [80]), node("node-c", [50], replicas={"web": 1}),
                                node("node-d", [60])])
    result = place(snap, [req("web-0", "web", gib=10)])[0]
    assert result.decision.scores == pytest.approx({"gpu_memory": 70 / 80, "spread": 1.0})
    assert result.explain() == ("node-b: gpu_memory 0.88 (GPU 0: 70 GiB left), spread 1.0 (0 replicas of this "
                                "deployment there); chosen over 3 other feasible nodes (next best node-d: 0.88)")
    assert result.decision.feasible == 4 and result.decision.runner_up[0] == "node-d"
    only = place(Snapshot.from_nodes([node("x")]), [req("r", gpus=0)])[0]
    assert only.explain() == "x: spread 1.0 (0 replicas of this deployment there); the only feasible node"


def test_ties_go_to_the_smallest_node_name():
    snap = Snapshot.from_nodes([node(name, [80, 80]) for name in ("node-c", "node-a", "node-b")])
    assert placed_on(place(snap, [req("r", "x", gib=10)])) == ["node-a"]
    again = place(snap, [req("r2", "y", gib=10)])[0]          # node-a's untouched GPU ties node-b's
    assert (again.node, again.gpu_indices) == ("node-a", (1,))


@pytest.mark.parametrize("seed", range(3))
def test_placement_is_deterministic(seed):
    views = random_cluster(seed)
    requests = random_requests(seed, 150)
    first = place(Snapshot.from_nodes(views), requests)
    again = place(Snapshot.from_nodes(list(reversed(views))), requests)
    assert first == again
    assert [explain(r) for r in first] == [explain(r) for r in again]


def test_placing_on_a_copy_leaves_the_snapshot_alone():
    snap = Snapshot.from_nodes([node("a", [80], replicas={"d": 1})])
    trial = snap.copy()
    place(trial, [req("r", gib=50)])
    assert snap.node("a").gpus[0].reserved == 0 and snap.node("a").replicas == {"d": 1}
    assert trial.node("a").gpus[0].reserved == 50 * GiB and trial.node("a").replicas == {"d": 2}
    assert np.array_equal(snap.avail_rank, Snapshot.from_nodes([node("a", [80])]).avail_rank)


def test_node_views_can_be_placed_on_directly_and_results_summarised():
    views = [node("a", [30]), node("b", [80], cordoned=True), node("c", [10])]
    result = place(views, [req("r", gib=40)])[0]
    assert summary(result) == "no node: 2 nodes lack 40 GiB free on one GPU; 1 node cordoned"
    assert explain_lines(result) == explain(result).splitlines() and len(explain_lines(result)) == 4
    assert explain_lines(result, limit=1) == [
        "r: no node: 2 nodes lack 40 GiB free on one GPU; 1 node cordoned",
        "  a: needs 40 GiB available on one GPU; the most available is 30 GiB on GPU 0",
        "  ... and 2 more nodes"]
    placed = place(views, [req("r", gib=20)])[0]
    assert summary(placed) == explain_lines(placed)[0] == placed.explain()
    assert [p.node for p in place_gang(views, [req("s0", gib=10), req("s1", gib=10)])] == ["a", "a"]
