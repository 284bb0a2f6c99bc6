"""The scheduler's routes and lost nodes, on a fake clock and a real temporary SQLite store."""

from __future__ import annotations

import pytest
from mesh_harness import deployment_yaml
from scheduler_brain import HEARTBEAT_TIMEOUT_S, brain, lose_node_a, run, two_ready_replicas_on_two_nodes

from meshserve.protos.mesh import control_pb2 as mesh


def test_a_lost_nodes_ready_replica_stays_routed_until_its_replacement_is_ready(tmp_path):
    async def test():
        async with brain(tmp_path) as b:
            on_a, on_b = await two_ready_replicas_on_two_nodes(b)
            replacement = await lose_node_a(b, on_b)

            # Not counted any more (a replacement is placed), but still routed and still assigned
            # to its node, so an agent that wakes up keeps serving it.
            assert b.core.cluster.replicas[on_a.id].state == "lost"
            assert b.routed() == {b.address(on_a.id), b.address(on_b.id)}
            assert [a.replica_id for a in b.core.assignments_for("node-a").replicas] == [on_a.id]

            await b.report("node-b", **{on_b.id: "ready", replacement.id: "starting"})
            await b.settle()
            assert b.address(on_a.id) in b.routed()

            await b.report("node-b", **{on_b.id: "ready", replacement.id: "ready"})
            await b.settle()
            assert b.routed() == {b.address(on_b.id), b.address(replacement.id)}
            assert on_a.id not in b.core.cluster.replicas
            assert list(b.core.assignments_for("node-a").replicas) == []
            assert await b.stored_replica_ids() == {on_b.id, replacement.id}
    run(test())


def test_a_lost_node_that_returns_before_the_replacement_is_ready_keeps_its_replica(tmp_path):
    async def test():
        async with brain(tmp_path) as b:
            on_a, on_b = await two_ready_replicas_on_two_nodes(b)
            replacement = await lose_node_a(b, on_b)

            await b.report("node-a", **{on_a.id: "ready"})   # the agent wakes up
            await b.settle()
            assert not b.core.node_is_lost("node-a")
            assert b.core.cluster.replicas[on_a.id].state == "ready"
            assert b.routed() == {b.address(on_a.id), b.address(on_b.id)}
            assert b.core.cluster.replicas[replacement.id].state == "draining"  # the surplus goes
            await b.report("node-b", **{on_b.id: "ready"})   # its agent stopped it
            await b.settle()
            assert await b.stored_replica_ids() == {on_a.id, on_b.id}
    run(test())


def test_a_lost_replica_whose_agent_returns_without_it_goes(tmp_path):
    async def test():
        async with brain(tmp_path) as b:
            on_a, on_b = await two_ready_replicas_on_two_nodes(b)
            await lose_node_a(b, on_b)
            await b.report("node-a")                         # back, but its replica died meanwhile
            await b.settle()
            assert on_a.id not in b.core.cluster.replicas
            assert b.address(on_a.id) not in b.routed()
    run(test())


def test_every_deployment_has_a_route_even_with_no_ready_replica(tmp_path):
    async def test():
        async with brain(tmp_path) as b:
            await b.apply(deployment_yaml("adder", replicas=1))   # no node: nothing can be placed
            [route] = b.core.route_table().routes
            assert (route.model, route.deployment, route.revision, route.weight) == ("add_sub", "adder", 1, 0)
            assert list(route.endpoints) == []

            await b.register("node-a")
            await b.settle()
            [replica] = b.on("node-a")
            await b.report("node-a", **{replica.id: "ready"})
            await b.settle()
            assert b.routed() == {b.address(replica.id)}

            await b.admin.Scale(mesh.ScaleRequest(name="adder", replicas=0), None)
            await b.settle()
            [route] = b.core.route_table().routes
            assert route.model == "add_sub" and list(route.endpoints) == []

            await b.admin.Delete(mesh.DeleteRequest(kind="deployment", name="adder"), None)
            await b.settle()
            assert list(b.core.route_table().routes) == []
    run(test())


@pytest.mark.parametrize("state", ["starting", "failed"])
def test_a_lost_nodes_replica_that_was_not_ready_is_placed_again_at_once(tmp_path, state):
    async def test():
        async with brain(tmp_path) as b:
            for node in ("node-a", "node-b"):
                await b.register(node)
            await b.apply(deployment_yaml("adder", replicas=2))
            [on_a], [on_b] = b.on("node-a"), b.on("node-b")
            await b.report("node-a", **{on_a.id: state})
            await b.report("node-b", **{on_b.id: "ready"})
            await b.settle()
            b.clock.now += HEARTBEAT_TIMEOUT_S + 1
            await b.report("node-b", **{on_b.id: "ready"})
            await b.settle()
            assert b.on("node-a") == [] and b.core.cluster.replicas[on_a.id].node == "node-b"
            assert b.routed() == {b.address(on_b.id)}
    run(test())


@pytest.mark.parametrize("name, refused", [("", True), ("x" * 254, True), ("absent", False)])
def test_wake_refuses_a_bad_name_and_answers_an_unknown_deployment_without_acting(tmp_path, name, refused):
    """A proxy's Wake: a name no deployment can have is INVALID_ARGUMENT; an unknown one is said, nothing moves."""
    from meshserve.common.errors import InvalidArgument
    from meshserve.scheduler.route_service import RouteService

    async def test():
        async with brain(tmp_path) as b:
            service = RouteService(b.core)
            if refused:
                with pytest.raises(InvalidArgument, match="deployment name"):
                    await service.Wake(mesh.WakeRequest(deployment=name), None)
            else:
                answer = await service.Wake(mesh.WakeRequest(deployment=name), None)
                assert "no deployment named 'absent'" in answer.message
            assert not b.core.cluster.deployments and not b.replicas()
    run(test())


def test_wake_of_a_deployment_without_autoscaling_says_how_to_scale_it(tmp_path):
    from meshserve.scheduler.route_service import RouteService

    async def test():
        async with brain(tmp_path) as b:
            await b.register("node-a")
            await b.apply(deployment_yaml("adder", replicas=0))
            answer = await RouteService(b.core).Wake(mesh.WakeRequest(deployment="adder"), None)
            assert "no autoscaling" in answer.message and "scheduler ctl scale adder N" in answer.message
            await b.settle()
            assert b.core.cluster.deployments["adder"].replicas == 0   # a Wake changes nothing here
    run(test())
