"""Each placement plugin alone, on a fake node list; and every filter's numpy mask against its own
per-node rule on seeded random clusters."""

from __future__ import annotations

import numpy as np
import pytest
from test_placement_fakes import node, random_cluster, random_requests, req

from meshserve.scheduler.placement import Snapshot
from meshserve.scheduler.placement.gpu_memory import GpuMemory
from meshserve.scheduler.placement.host_resources import HostResources
from meshserve.scheduler.placement.node_ready import NodeReady
from meshserve.scheduler.placement.node_selector import NodeSelector
from meshserve.scheduler.placement.pack import Pack
from meshserve.scheduler.placement.spread import Spread

FILTERS = [NodeReady(), NodeSelector(), HostResources(), GpuMemory()]


def names(snapshot, mask):
    return [snapshot.names[row] for row in np.flatnonzero(mask)]


def all_rows(snapshot):
    return np.arange(len(snapshot))


# -- node_ready ------------------------------------------------------------------------------

def test_node_ready_excludes_lost_and_cordoned_nodes_with_their_reasons():
    snap = Snapshot.from_nodes([node("a"), node("b", cordoned=True), node("c", ready=False),
                                node("d", ready=False, cordoned=True)])
    plugin, r = NodeReady(), req("r")
    assert names(snap, plugin.mask(snap, r)) == ["a"]
    assert [plugin.check(snap, r, row) for row in range(4)] == [
        None, "cordoned", "not ready (lost, or not reporting yet)", "not ready (lost, or not reporting yet)"]
    assert plugin.summarize(snap, r, np.array([1, 2, 3])) == [("not ready", 2), ("cordoned", 1)]


# -- node_selector ---------------------------------------------------------------------------

def test_node_selector_keeps_nodes_whose_labels_all_match():
    snap = Snapshot.from_nodes([node("a", labels={"gpu": "h100", "zone": "x"}),
                                node("b", labels={"gpu": "h100", "zone": "y"}),
                                node("c", labels={"gpu": "a100"}), node("d")])
    plugin = NodeSelector()
    assert plugin.mask(snap, req("r")) is None                       # no selector: no opinion
    r = req("r", selector={"gpu": "h100", "zone": "x"})
    assert names(snap, plugin.mask(snap, r)) == ["a"]
    assert plugin.check(snap, r, 1) == "does not match selector: zone=y (wants x)"
    assert plugin.check(snap, r, 3) == ("does not match selector: no label gpu (wants h100), "
                                        "no label zone (wants x)")
    assert plugin.summarize(snap, r, np.array([1, 2, 3])) == [("do not match selector gpu=h100,zone=x", 3)]


# -- host_resources --------------------------------------------------------------------------

def test_host_resources_needs_cpu_and_memory_free():
    snap = Snapshot.from_nodes([node("a", cpu=4, memory_gib=64), node("b", cpu=1, memory_gib=64),
                                node("c", cpu=8, memory_gib=8)])
    plugin = HostResources()
    assert plugin.mask(snap, req("r", cpu=0, memory_gib=0)) is None
    r = req("r", cpu=2, memory_gib=16)
    assert names(snap, plugin.mask(snap, r)) == ["a"]
    assert plugin.check(snap, r, 1) == "needs 2 CPUs, has 1 free"
    assert plugin.check(snap, r, 2) == "needs 16 GiB host memory, has 8 GiB free"
    assert plugin.summarize(snap, r, np.array([1, 2])) == [("lack 2 CPUs free", 1),
                                                           ("lack 16 GiB host memory free", 1)]


def test_host_resources_forgives_float_rounding_of_booked_cpu():
    snap = Snapshot.from_nodes([node("a", cpu=0.3)])
    tenth = req("r", gpus=0, cpu=0.1, memory_gib=0)
    for _ in range(2):
        snap.reserve(0, (), tenth)
    assert snap.cpu_free[0] < 0.1                          # 0.3 - 0.1 - 0.1 = 0.0999...
    assert HostResources().mask(snap, tenth)[0]
    snap.reserve(0, (), tenth)
    assert not HostResources().mask(snap, tenth)[0]


# -- gpu_memory ------------------------------------------------------------------------------

def test_gpu_memory_counts_available_memory_free_less_reserved():
    snap = Snapshot.from_nodes([node("a", [80], reserved_gib=[50]), node("b", [45])])
    plugin, r = GpuMemory(), req("r", gib=40)
    assert names(snap, plugin.mask(snap, r)) == ["b"]                # a: 80 free, 50 reserved -> 30
    assert plugin.check(snap, r, 0) == ("needs 40 GiB available on one GPU; the most available is "
                                        "30 GiB on GPU 0 (80 GiB free less 50 GiB reserved)")
    assert plugin.summarize(snap, r, np.array([0])) == [("lack 40 GiB free on one GPU", 1)]


def test_gpu_memory_needs_k_distinct_gpus_on_one_node():
    snap = Snapshot.from_nodes([node("a", [80, 30, 50]), node("b", [80]), node("c", [45, 41, 10]), node("d", [])])
    plugin, r = GpuMemory(), req("r", gpus=2, gib=40)
    assert names(snap, plugin.mask(snap, r)) == ["a", "c"]
    assert plugin.check(snap, r, 1) == "has 1 GPU, needs 2"
    assert plugin.check(snap, r, 3) == "has 0 GPUs, needs 2"
    assert plugin.summarize(snap, r, np.array([1])) == [("lack 40 GiB free on each of 2 GPUs", 1)]
    assert names(snap, plugin.mask(snap, req("r", gpus=4, gib=1))) == []
    assert plugin.mask(snap, req("r", gpus=0)) is None


def test_gpu_memory_chooses_best_fit_for_pack_and_most_free_for_spread():
    snap = Snapshot.from_nodes([node("a", [80, 12, 30, 10, 12])])
    plugin = GpuMemory()
    assert plugin.assign(snap, req("r", gib=11, strategy="pack"), 0) == (1,)      # 12, lower index on a tie
    assert plugin.assign(snap, req("r", gib=11, strategy="spread"), 0) == (0,)
    assert plugin.assign(snap, req("r", gpus=2, gib=11, strategy="pack"), 0) == (1, 4)
    assert plugin.assign(snap, req("r", gpus=2, gib=11, strategy="spread"), 0) == (0, 2)
    assert plugin.assign(snap, req("r", gpus=0), 0) == ()


def test_gpu_memory_score_rates_headroom_for_spread_and_tightness_for_pack():
    snap = Snapshot.from_nodes([node("a", [80, 20]), node("b", [50]), node("c", [30, 25])])
    plugin, rows = GpuMemory(), all_rows(snap)
    spread = plugin.score(snap, req("r", gib=20), rows)
    pack = plugin.score(snap, req("r", gib=20, strategy="pack"), rows)
    assert spread == pytest.approx([60 / 80, 30 / 80, 10 / 80])     # most free GPU, what is left
    assert pack == pytest.approx([1.0, 1 - 30 / 80, 1 - 5 / 80])   # tightest fitting GPU
    two = plugin.score(snap, req("r", gpus=2, gib=20, strategy="pack"), np.array([0, 2]))
    assert two == pytest.approx([1 - 60 / 160, 1 - 15 / 160])
    assert plugin.score(snap, req("r", gpus=0), rows) is None


# -- spread and pack -------------------------------------------------------------------------

def test_spread_scores_fewer_replicas_of_the_deployment_higher():
    snap = Snapshot.from_nodes([node("a", replicas={"d": 2, "other": 9}), node("b", replicas={"d": 1}), node("c")])
    plugin = Spread()
    assert plugin.score(snap, req("r"), all_rows(snap)) == pytest.approx([0.0, 0.5, 1.0])
    assert plugin.score(snap, req("r", "other"), np.array([1, 2])) == pytest.approx([1.0, 1.0])
    assert plugin.note(snap, req("r"), 1, ()) == "1 replica of this deployment there"
    assert plugin.note(snap, req("r"), 2, ()) == "0 replicas of this deployment there"


def test_pack_scores_fuller_nodes_higher():
    snap = Snapshot.from_nodes([node("a", [80, 80]), node("b", [40, 80], reserved_gib=[20, 0]), node("c", [])])
    plugin = Pack()
    assert plugin.score(snap, req("r"), all_rows(snap)) == pytest.approx([0.0, 60 / 160, 0.0])
    assert plugin.note(snap, req("r"), 1, ()) == "38% of its GPU memory in use"


# -- every filter: vectorized == per node ----------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_every_filter_mask_agrees_with_its_per_node_check(seed):
    snap = Snapshot.from_nodes(random_cluster(seed))
    for r in random_requests(seed, 60):
        for plugin in FILTERS:
            mask = plugin.mask(snap, r)
            if mask is None:
                mask = np.ones(len(snap), bool)
            by_row = [plugin.check(snap, r, row) is None for row in range(len(snap))]
            assert mask.tolist() == by_row, (plugin.name, r)
            rejected = np.flatnonzero(~mask)
            assert list(plugin.reasons(snap, r, rejected)) == [plugin.check(snap, r, row) for row in rejected]
            assert sum(n for _, n in plugin.summarize(snap, r, rejected)) == rejected.size
