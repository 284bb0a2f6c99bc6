"""``AdminService.DeleteNode``: forgetting a node that never comes back (issue 8, item 19).

The scheduler's brain on a fake clock and a real temporary SQLite store.
"""

from __future__ import annotations

import pytest
from scheduler_brain import Brain, brain, lose_node_a, run, two_ready_replicas_on_two_nodes

from meshserve.common.errors import FailedPrecondition, NotFound
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.scheduler.records import NODES


async def delete(b: Brain, name: str, force: bool = False) -> list[str]:
    reply = await b.admin.DeleteNode(mesh.DeleteNodeRequest(name=name, force=force), None)
    return list(reply.replicas)


async def node_names(b: Brain) -> list[str]:
    listed = [node.name for node in (await b.admin.Get(mesh.GetRequest(kind="nodes"), None)).nodes]
    stored, _ = await b.store.range(NODES)
    assert sorted(kv.key[len(NODES):] for kv in stored) == listed   # the store agrees with memory
    return listed


def test_a_lost_node_that_holds_nothing_is_deleted_and_leaves_get_nodes(tmp_path):
    async def test():
        async with brain(tmp_path) as b:
            on_a, on_b = await two_ready_replicas_on_two_nodes(b)
            replacement = await lose_node_a(b, on_b)
            await b.report("node-b", **{on_b.id: "ready", replacement.id: "ready"})
            await b.settle()                                  # the lost replica is replaced and gone
            assert b.on("node-a") == []
            assert await delete(b, "node-a") == []
            assert await node_names(b) == ["node-b"]
            await b.settle()
            assert {r.id for r in b.replicas()} == {on_b.id, replacement.id}
    run(test())


def test_a_node_that_holds_replicas_is_refused_unless_forced(tmp_path):
    async def test():
        async with brain(tmp_path) as b:
            on_a, on_b = await two_ready_replicas_on_two_nodes(b)
            await lose_node_a(b, on_b)
            with pytest.raises(FailedPrecondition) as refused:
                await delete(b, "node-a")
            assert on_a.id in refused.value.message and "force" in refused.value.message
            assert await node_names(b) == ["node-a", "node-b"]

            assert await delete(b, "node-a", force=True) == [on_a.id]
            assert await node_names(b) == ["node-b"]
            await b.settle()
            # The lost stand-in is forgotten with its node: nothing points at node-a any more.
            assert all(r.node != "node-a" for r in b.replicas())
            assert len([r for r in b.replicas() if r.node == "node-b"]) == 2
    run(test())


def test_a_connected_node_is_refused_unless_forced_and_its_replicas_move(tmp_path):
    async def test():
        async with brain(tmp_path) as b:
            on_a, on_b = await two_ready_replicas_on_two_nodes(b)
            with pytest.raises(FailedPrecondition) as refused:
                await delete(b, "node-a")
            assert "connected" in refused.value.message

            assert await delete(b, "node-a", force=True) == [on_a.id]
            moved = b.core.cluster.replicas[on_a.id]
            assert (moved.state, moved.node) == ("pending", "")     # evicted at once, not adopted back
            await b.register("node-a")                               # the live agent comes back: a new node
            assert b.core.assignments_for("node-a").replicas == []  # so it stops what it ran
            await b.settle()
            assert await node_names(b) == ["node-a", "node-b"]
            assert b.core.cluster.replicas[on_a.id].node in ("node-a", "node-b")
    run(test())


def test_deleting_an_unknown_node_is_not_found(tmp_path):
    async def test():
        async with brain(tmp_path) as b:
            with pytest.raises(NotFound):
                await delete(b, "ghost", force=True)
    run(test())
