"""The snapshot: built from reports, kept fresh one report at a time, equal to a rebuild."""

from __future__ import annotations

import random

import numpy as np
import pytest
from test_placement_fakes import node, random_cluster, req

from meshserve.scheduler.placement import GiB, Snapshot, place
from meshserve.scheduler.placement.snapshot import PAD

ARRAYS = ("gpu_index", "gpu_total", "gpu_free", "gpu_reserved", "gpu_avail", "avail_rank", "gpu_count", "gpu_cap",
          "gpu_total_sum", "gpu_avail_sum", "cpu_free", "memory_free", "ready", "cordoned", "schedulable")


def assert_same(a: Snapshot, b: Snapshot):
    assert a.names == b.names
    for column in ARRAYS:
        assert np.array_equal(getattr(a, column), getattr(b, column)), column
    assert a.labels == b.labels and a.gpu_uuid == b.gpu_uuid and a.replicas == b.replicas
    for deployment in {d for counter in a.replicas for d in counter}:
        assert np.array_equal(a.replica_counts(deployment), b.replica_counts(deployment)), deployment


def test_rows_are_sorted_by_name_and_gpus_by_index():
    view = node("b", [10, 20])
    view.gpus.reverse()
    snap = Snapshot.from_nodes([view, node("a", [80])])
    assert snap.names == ["a", "b"] and len(snap) == 2 and "a" in snap and "z" not in snap
    assert snap.gpu_index.tolist() == [[0, -1], [0, 1]]
    assert snap.gpu_avail[0, 1] == PAD and snap.avail_rank[:, 1].tolist() == [20 * GiB, 10 * GiB]
    assert snap.node("b").gpus[1].memory_free == 20 * GiB


def test_duplicate_or_unknown_names_are_errors():
    with pytest.raises(ValueError, match="duplicate node names: a"):
        Snapshot.from_nodes([node("a"), node("a")])
    with pytest.raises(KeyError, match="no node named 'x'"):
        Snapshot.from_nodes([node("a")]).node("x")


def test_a_report_replaces_the_row_labels_and_replica_counts_included():
    snap = Snapshot.from_nodes([node("a", [80], labels={"zone": "x"}, replicas={"web": 2}), node("b")])
    assert snap.label_mask("zone", "x").tolist() == [True, False]          # cached from here on
    snap.update_node(node("a", [40], labels={"zone": "y"}, replicas={"db": 1}))
    assert snap.label_mask("zone", "x").tolist() == [False, False]
    assert snap.replica_counts("web").tolist() == [0, 0] and snap.replica_counts("db").tolist() == [1, 0]
    assert snap.node("a").gpus[0].memory_free == 40 * GiB
    assert place(snap, [req("r", selector={"zone": "y"})])[0].node == "a"


def test_updates_adds_removes_and_wider_nodes_end_equal_to_a_rebuild():
    rng = random.Random(3)
    views = {view.name: view for view in random_cluster(3, nodes=12, gpus=4)}
    snap = Snapshot.from_nodes(views.values())
    snap.label_mask("zone", "a")
    for step in range(60):
        action = rng.random()
        if action < 0.2 and views:
            name = rng.choice(sorted(views))
            snap.remove_node(name)
            del views[name]
        else:
            source = random_cluster(100 + step, nodes=1, gpus=rng.choice([2, 4, 6]))[0]
            name = rng.choice(sorted(views)) if action < 0.6 and views else f"new-{step:02d}"
            source.name = name
            source.replicas.update({f"dep{rng.randint(0, 3)}": rng.randint(0, 2)})
            views[name] = source
            snap.update_node(source)
        if step % 10 == 9:
            rebuilt = Snapshot.from_nodes(views.values())
            if rebuilt.width < snap.width:            # once widened a snapshot stays wide: pad to compare
                rebuilt._widen(snap.width)
            assert_same(snap, rebuilt)
            assert snap.label_mask("zone", "a").tolist() == rebuilt.label_mask("zone", "a").tolist()


def test_a_node_with_more_gpus_widens_every_row():
    snap = Snapshot.from_nodes([node("a", [80])])
    snap.update_node(node("b", [10, 20, 30]))
    assert snap.width == 3 and snap.gpu_avail[0].tolist() == [80 * GiB, PAD, PAD]
    assert place(snap, [req("r", gpus=3, gib=10)])[0].node == "b"


def test_results_keep_their_node_names_when_nodes_come_and_go():
    snap = Snapshot.from_nodes([node("b", [10])])
    result = place(snap, [req("r", gib=40)])[0]
    snap.update_node(node("a", [10]))
    snap.remove_node("b")
    assert dict(result.rejected) == {"b": "needs 40 GiB available on one GPU; the most available is 10 GiB on GPU 0"}


def test_node_views_round_trip():
    views = sorted(random_cluster(5, nodes=8), key=lambda view: view.name)
    snap = Snapshot.from_nodes(views)
    for view in views:
        view.gpus.sort(key=lambda gpu: gpu.index)
    assert snap.nodes() == views
