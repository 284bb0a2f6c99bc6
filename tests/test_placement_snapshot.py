"""The snapshot: declared columns, built whole from reports, kept consistent by ``reserve``."""

from __future__ import annotations

import dataclasses
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


def test_every_column_is_declared_and_has_one_entry_per_row():
    """The columns are dataclass fields (greppable, typed), not attributes made in a loop."""
    declared = {f.name for f in dataclasses.fields(Snapshot)}
    assert set(ARRAYS) <= declared
    snap = Snapshot.from_nodes(random_cluster(2, nodes=7, gpus=3))
    for column in ARRAYS:
        array = getattr(snap, column)
        assert isinstance(array, np.ndarray), column
        assert array.shape[0 if column != "avail_rank" else 1] == len(snap), column
    assert not hasattr(snap, "update_node")      # rebuilt each pass: there is no incremental path to drift


def test_a_rebuild_from_the_nodes_as_placed_equals_the_snapshot_after_reserving():
    """``reserve`` keeps every derived column (ranks, sums, counts) equal to a rebuild from scratch."""
    rng = random.Random(3)
    snap = Snapshot.from_nodes(random_cluster(3, nodes=12, gpus=4))
    snap.label_mask("zone", "a")
    for step in range(40):
        place(snap, [req(f"r{step}", f"dep{rng.randint(0, 3)}", gpus=rng.choice([0, 1, 2]), gib=rng.choice([4, 20]),
                         cpu=0.5, memory_gib=1)])
        if step % 10 == 9:
            rebuilt = Snapshot.from_nodes(snap.nodes())
            assert_same(snap, rebuilt)
            assert snap.label_mask("zone", "a").tolist() == rebuilt.label_mask("zone", "a").tolist()


def test_a_copy_is_independent():
    snap = Snapshot.from_nodes([node("a", [80]), node("b", [80])])
    trial = snap.copy()
    place(trial, [req("r", "web", gib=60)])
    assert snap.gpu_avail[:, 0].tolist() == [80 * GiB, 80 * GiB] and snap.replica_counts("web").tolist() == [0, 0]
    assert sorted(trial.gpu_avail[:, 0].tolist()) == [20 * GiB, 80 * GiB]


def test_nodes_with_different_gpu_counts_share_one_padded_width():
    snap = Snapshot.from_nodes([node("a", [80]), node("b", [10, 20, 30])])
    assert snap.width == 3 and snap.gpu_avail[0].tolist() == [80 * GiB, PAD, PAD]
    assert place(snap, [req("r", gpus=3, gib=10)])[0].node == "b"


def test_results_keep_their_node_names_when_the_next_pass_has_other_nodes():
    snap = Snapshot.from_nodes([node("b", [10])])
    result = place(snap, [req("r", gib=40)])[0]
    Snapshot.from_nodes([node("a", [10])])
    assert dict(result.rejected) == {"b": "needs 40 GiB available on one GPU; the most available is 10 GiB on GPU 0"}


def test_node_views_round_trip():
    views = sorted(random_cluster(5, nodes=8), key=lambda view: view.name)
    snap = Snapshot.from_nodes(views)
    for view in views:
        view.gpus.sort(key=lambda gpu: gpu.index)
    assert snap.nodes() == views
