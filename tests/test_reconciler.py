"""The reconciler and the scheduler core, table by table: a fake clock, a real SQLite store, no processes.

Agents are played by ``follow``: every node reports the replicas its assignments name as
ready (and no longer reports what it was told to stop), then the reconciler settles. Each
table row is one scenario; the expectations are counted from the in-memory cluster and
checked against the store (``stored_replica_ids``), so nothing passes on memory alone.
"""

from __future__ import annotations

from collections import Counter

import pytest
from mesh_harness import deployment_yaml
from scheduler_brain import HEARTBEAT_TIMEOUT_S, Brain, brain, run

from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.scheduler.records import DEPLOYMENTS, DeploymentRecord, ReplicaRecord

NODES = ("node-a", "node-b", "node-c")
# Rounds of "agents report, reconciler settles" a scenario may take: far more than any needs.
MAX_ROUNDS = 30


async def follow(b: Brain, nodes=NODES, *, starting: frozenset[str] = frozenset()) -> None:
    """One round: each node's agent runs exactly its assignments and reports them ready
    (those in ``starting`` as starting); the reconciler settles."""
    for node in nodes:
        states = {a.replica_id: "starting" if a.replica_id in starting else "ready"
                  for a in b.core.assignments_for(node).replicas}
        await b.report(node, **states)
    await b.settle()


async def converge(b: Brain, nodes=NODES, watch=None) -> int:
    """``follow`` until nothing changes; returns the rounds it took. ``watch(b)`` runs after each round."""
    before = None
    for rounds in range(1, MAX_ROUNDS + 1):
        await follow(b, nodes)
        if watch is not None:
            watch(b)
        now = sorted((r.id, r.state, r.node, r.revision) for r in b.replicas())
        if now == before:
            return rounds
        before = now
    raise AssertionError(f"no steady state after {MAX_ROUNDS} rounds: {before}")


async def started(b: Brain, yaml_text: str, nodes=NODES) -> None:
    for node in nodes:
        await b.register(node)
    await b.apply(yaml_text)
    await converge(b, nodes)


def states(b: Brain, deployment: str = "adder") -> Counter:
    """state@revision -> replicas, e.g. {"ready@1": 2}."""
    return Counter(f"{r.state}@{r.revision}" for r in b.replicas() if r.deployment == deployment)


async def assert_stored(b: Brain) -> None:
    assert await b.stored_replica_ids() == {r.id for r in b.replicas()}
    items, _ = await b.store.range(DEPLOYMENTS)
    stored = {record.name: record for record in (DeploymentRecord.from_json(item.value) for item in items)}
    assert stored == b.core.cluster.deployments


def adder(replicas: int, cpu: str = "100m", **extra: str) -> str:
    text = deployment_yaml("adder", replicas=replicas, cpu=cpu)
    return text + "".join(f"{line}\n" for line in extra.values())


CANARY = "rollout: {strategy: canary, canary_weight: 20, canary_replicas: 1}"


# -- scaling -------------------------------------------------------------------------------------

@pytest.mark.parametrize("start, scaled, how", [
    (1, 3, "apply"), (3, 1, "apply"), (2, 0, "apply"), (0, 2, "apply"),
    (1, 3, "scale"), (3, 1, "scale"), (2, 2, "scale"),
])
def test_scaling_reaches_exactly_the_desired_ready_replicas_and_drains_the_rest(tmp_path, start, scaled, how):
    async def test():
        async with brain(tmp_path) as b:
            await started(b, adder(start))
            assert states(b) == Counter({"ready@1": start} if start else {})
            if how == "apply":
                await b.apply(adder(scaled))
            else:
                await b.admin.Scale(mesh.ScaleRequest(name="adder", replicas=scaled), None)
                await b.settle()
            if scaled < start:   # the surplus leaves the routes at once and drains
                assert states(b)["draining@1"] == start - scaled
                assert len(b.routed()) == scaled
            await converge(b)
            assert states(b) == Counter({"ready@1": scaled} if scaled else {})
            assert b.core.cluster.deployments["adder"].revision == 1     # scaling makes no revision
            await assert_stored(b)
    run(test())


@pytest.mark.parametrize("agent_state, goes_first", [("failed", True), ("starting", True), ("ready", False)])
def test_scaling_down_removes_the_least_useful_replica_first(tmp_path, agent_state, goes_first):
    async def test():
        async with brain(tmp_path) as b:
            await started(b, adder(2), nodes=NODES[:2])
            first, last = b.replicas()            # by id: ties in usefulness go by id, so test the last
            await b.report(last.node, **{last.id: agent_state})
            await b.report(first.node, **{first.id: "ready"})
            await b.apply(adder(1))
            removed = {r.id for r in b.replicas("draining")}
            assert removed == ({last.id} if goes_first else {first.id})
    run(test())


# -- rolling update (surge 1) --------------------------------------------------------------------

@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_a_new_revision_rolls_one_extra_replica_at_a_time_and_never_drops_below_desired(tmp_path, replicas):
    async def test():
        async with brain(tmp_path) as b:
            await started(b, adder(replicas))
            seen: list[tuple[int, int]] = []     # (in service, routed) after every round

            def watch(b: Brain) -> None:
                in_service = [r for r in b.replicas() if r.state not in ("draining", "lost")]
                seen.append((len(in_service), len(b.routed())))

            await b.apply(adder(replicas, cpu="200m"))          # resources changed: revision 2
            assert b.core.cluster.deployments["adder"].revision == 2
            assert len([r for r in b.replicas() if r.revision == 2]) == 1   # surge 1: one at a time
            await converge(b, watch=watch)
            assert states(b) == Counter({"ready@2": replicas})
            assert max(in_service for in_service, _ in seen) <= replicas + 1
            assert min(routed for _, routed in seen) >= replicas
            assert b.core.route_table().routes[0].revision == 2
            await assert_stored(b)
    run(test())


@pytest.mark.parametrize("change, new_revision", [
    ("replicas", False), ("rollout", False), ("cpu", True), ("runtime_args", True),
])
def test_only_a_change_that_needs_new_replicas_makes_a_revision(tmp_path, change, new_revision):
    async def test():
        async with brain(tmp_path) as b:
            await started(b, adder(2))
            changed = {"replicas": adder(3), "rollout": adder(2, rollout=CANARY),
                       "cpu": adder(2, cpu="300m"), "runtime_args": adder(2, args="runtime_args: [--drain-delay, '1']")}
            await b.apply(changed[change])
            record = b.core.cluster.deployments["adder"]
            assert record.revision == (2 if new_revision else 1)
            assert [entry.revision for entry in record.history] == ([1, 2] if new_revision else [1])
            await assert_stored(b)
    run(test())


# -- canary, promote, rollback -------------------------------------------------------------------

def route_weights(b: Brain) -> dict[int, int]:
    return {route.revision: route.weight for route in b.core.route_table().routes if route.endpoints}


@pytest.mark.parametrize("verb, final_revision, final_states", [
    ("promote", 2, {"ready@2": 3}),
    ("rollback", 1, {"ready@1": 3}),
])
def test_a_canary_runs_beside_the_stable_revision_until_promoted_or_rolled_back(tmp_path, verb, final_revision,
                                                                                final_states):
    async def test():
        async with brain(tmp_path) as b:
            await started(b, adder(3))
            await b.apply(adder(3, cpu="200m", rollout=CANARY))
            await converge(b)
            record = b.core.cluster.deployments["adder"]
            assert record.canary_active and record.stable_revision == 1 and record.canary_weight == 20
            assert states(b) == Counter({"ready@1": 3, "ready@2": 1})
            assert route_weights(b) == {1: 80, 2: 20}

            call = b.admin.Promote if verb == "promote" else b.admin.Rollback
            reply = await call(mesh.RolloutRequest(name="adder"), None)
            assert reply.revision == final_revision
            await converge(b)
            record = b.core.cluster.deployments["adder"]
            assert not record.canary_active and record.revision == record.stable_revision == final_revision
            assert states(b) == Counter(final_states)
            assert route_weights(b) == {final_revision: 3}
            assert record.spec == record.spec_of(final_revision).replace(replicas=3)
            await assert_stored(b)
    run(test())


def test_rollback_of_a_rolled_out_revision_restores_the_earlier_spec_from_history(tmp_path):
    async def test():
        async with brain(tmp_path) as b:
            await started(b, adder(2))
            await b.apply(adder(2, cpu="250m"))
            await converge(b)
            await b.admin.Scale(mesh.ScaleRequest(name="adder", replicas=3), None)
            reply = await b.admin.Rollback(mesh.RolloutRequest(name="adder"), None)
            assert reply.revision == 1
            record = b.core.cluster.deployments["adder"]
            assert record.spec.resources.cpu == 0.1 and record.replicas == record.spec.replicas == 3
            await converge(b)
            assert states(b) == Counter({"ready@1": 3})
            await assert_stored(b)
    run(test())


def test_rollback_without_an_earlier_revision_is_refused(tmp_path):
    async def test():
        async with brain(tmp_path) as b:
            await started(b, adder(1))
            with pytest.raises(Exception, match="no earlier revision"):
                await b.admin.Rollback(mesh.RolloutRequest(name="adder"), None)
    run(test())


# -- lost nodes, cordon and drain ----------------------------------------------------------------

@pytest.mark.parametrize("event, moved, stays_routed", [
    ("lost", True, True),        # silent past the heartbeat timeout: replaced, routed until then
    ("drain", True, False),      # drained: placed again elsewhere at once
    ("cordon", False, True),     # cordoned: keeps what it runs, takes nothing new
])
def test_a_node_event_moves_its_replicas_or_not(tmp_path, event, moved, stays_routed):
    async def test():
        async with brain(tmp_path) as b:
            await started(b, adder(2), nodes=NODES)
            [victim] = [r for r in b.replicas() if r.node == "node-a"] or [b.replicas()[0]]
            node = victim.node
            others = tuple(n for n in NODES if n != node)
            address = b.address(victim.id)
            if event == "lost":
                b.clock.now += HEARTBEAT_TIMEOUT_S + 1
                await follow(b, others)
                assert b.core.node_is_lost(node)
            elif event == "drain":
                await b.admin.Drain(mesh.NodeRequest(name=node), None)
                await b.settle()
            else:
                await b.admin.Cordon(mesh.NodeRequest(name=node), None)
                await b.settle()
            assert (address in b.routed()) == stays_routed
            await converge(b, others)
            assert states(b) == Counter({"ready@1": 2})
            assert any(r.node == node for r in b.replicas()) == (not moved)
            await b.apply(adder(4))                               # new replicas avoid the node
            await converge(b, others)
            assert [r.node for r in b.replicas()].count(node) == (0 if moved else 1)
            await assert_stored(b)
    run(test())


def test_within_the_grace_after_taking_over_no_node_is_lost(tmp_path):
    async def test():
        async with brain(tmp_path) as b:
            await started(b, adder(1), nodes=NODES[:1])
            b.core.reconciler.lost_grace_s = 3 * HEARTBEAT_TIMEOUT_S
            b.core.reconciler.begin_grace()
            b.clock.now += 2 * HEARTBEAT_TIMEOUT_S
            await b.settle()
            assert not b.core.node_is_lost("node-a")
            b.clock.now += 2 * HEARTBEAT_TIMEOUT_S
            await b.settle()
            assert b.core.node_is_lost("node-a")
    run(test())


# -- pipelines and orphans -----------------------------------------------------------------------

def pipeline(colocate: str) -> str:
    return f"""kind: Pipeline
name: pipe
model: {{repository: /models, name: pipe}}
colocate: {colocate}
resources: {{cpu: 100m}}
steps:
  - {{model: pre, resources: {{gpus: 1, gpu_memory: 50GiB, cpu: 100m}}}}
  - {{model: post, resources: {{gpus: 1, gpu_memory: 50GiB, cpu: 100m}}}}
"""


def groups(b: Brain) -> dict[str, list[ReplicaRecord]]:
    out: dict[str, list[ReplicaRecord]] = {}
    for replica in b.replicas():
        if replica.deployment == "pipe" and replica.state not in ("draining", "lost"):
            out.setdefault(replica.group, []).append(replica)
    return out


@pytest.mark.parametrize("colocate, processes", [("required", 1), ("none", 2)])
@pytest.mark.parametrize("event", ["drain-leader", "drain-step", "delete-step-node"])
def test_a_pipeline_group_is_evicted_and_placed_again_as_a_whole(tmp_path, colocate, processes, event):
    async def test():
        async with brain(tmp_path) as b:
            await started(b, pipeline(colocate))
            [(leader_id, members)] = groups(b).items()
            assert len(members) == processes and all(r.state == "ready" for r in members)
            leader = b.core.cluster.replicas[leader_id]
            target = leader if event == "drain-leader" or processes == 1 else \
                next(r for r in members if r.id != leader_id)
            node, old_steps = target.node, {m.id for m in members if m.id != leader_id}
            if event == "delete-step-node":
                await b.admin.DeleteNode(mesh.DeleteNodeRequest(name=node, force=True), None)
            else:
                await b.admin.Drain(mesh.NodeRequest(name=node, force=True), None)   # the group is all there
            await b.settle()
            # The whole group leaves that node: its steps drain (or go), its leader is placed again.
            assert all(r.state == "draining" or r.node != node for r in b.replicas() if r.id in old_steps)
            assert all(b.core.cluster.replicas[step].state == "draining" for step in old_steps
                       if step in b.core.cluster.replicas)
            assert b.core.cluster.replicas[leader_id].node != node
            alive = tuple(n for n in NODES if n != node or event != "delete-step-node")
            await converge(b, alive)     # a drained node's agent stops what it no longer runs
            [(new_leader, new_members)] = groups(b).items()
            assert new_leader == leader_id and len(new_members) == processes
            assert all(r.state == "ready" and r.node != node for r in new_members)
            assert not set(old_steps) & {r.id for r in b.replicas()}
            await assert_stored(b)
    run(test())


@pytest.mark.parametrize("state", ["ready", "pending"])
def test_a_deleted_deployments_replicas_go_drained_or_at_once(tmp_path, state):
    async def test():
        async with brain(tmp_path) as b:
            nodes = NODES if state == "ready" else ()
            for node in NODES:
                await b.register(node)
            if state == "pending":    # nothing fits: every replica waits
                await b.apply(deployment_yaml("adder", replicas=2, gpu_memory="500GiB"))
            else:
                await b.apply(adder(2))
                await converge(b, nodes)
            assert states(b) == Counter({f"{state}@1": 2})
            await b.admin.Delete(mesh.DeleteRequest(kind="deployment", name="adder"), None)
            await b.settle()
            assert states(b) == Counter({"draining@1": 2} if state == "ready" else {})
            await converge(b, nodes)
            assert b.replicas() == [] and await b.stored_replica_ids() == set()
            routes = b.core.route_table().routes
            assert [route.deployment for route in routes] == []
    run(test())


# -- rollout settings (scheduler/rollouts.py) ------------------------------------------------------

@pytest.mark.parametrize("replicas, surge, unavailable, most_in_service, fewest_ready", [
    (4, "1", "0", 5, 4),          # the default: one extra, never below desired
    (4, "2", "0", 6, 4),
    (4, "0", "1", 4, 3),          # no surge: one old leaves first
    (4, '"50%"', '"25%"', 6, 3),  # percentages: surge rounds up (2), unavailable down (1)
])
def test_max_surge_and_max_unavailable_bound_every_round(tmp_path, replicas, surge, unavailable, most_in_service,
                                                         fewest_ready):
    rollout = f"rollout: {{max_surge: {surge}, max_unavailable: {unavailable}}}"

    async def test():
        async with brain(tmp_path) as b:
            await started(b, adder(replicas, rollout=rollout))
            seen: list[tuple[int, int]] = []     # (in service, ready) after every round

            def watch(b: Brain) -> None:
                in_service = [r for r in b.replicas() if r.state not in ("draining", "lost")]
                seen.append((len(in_service), sum(1 for r in in_service if r.state == "ready")))

            await b.apply(adder(replicas, cpu="200m", rollout=rollout))
            await converge(b, watch=watch)
            assert states(b) == Counter({"ready@2": replicas})
            assert max(in_service for in_service, _ in seen) <= most_in_service
            assert min(ready for _, ready in seen) >= fewest_ready
            assert b.core.cluster.deployments["adder"].rollout_state == "complete"
            await assert_stored(b)
    run(test())


@pytest.mark.parametrize("auto_rollback, final_revision, state_prefix", [
    ("true", 1, "rolled back: revision 2"), ("false", 2, "failed: "),
])
def test_a_crash_looping_revision_is_rolled_back_or_marked_failed(tmp_path, auto_rollback, final_revision,
                                                                  state_prefix):
    rollout = f"rollout: {{auto_rollback: {auto_rollback}}}"

    async def test():
        async with brain(tmp_path) as b:
            await started(b, adder(2, rollout=rollout))
            await b.apply(adder(2, cpu="200m", rollout=rollout))
            for _ in range(3):
                await follow(b, starting=frozenset())   # old ones ready; the new one...
                new = [r for r in b.replicas() if r.revision == 2 and r.node]
                for replica in new:                     # ...crashes on every start
                    await b.report(replica.node, **{replica.id: "failed"})
                await b.settle()
            record = b.core.cluster.deployments["adder"]
            assert record.revision == final_revision
            assert record.rollout_state.startswith(state_prefix), record.rollout_state
            if auto_rollback == "true":
                await converge(b)
                assert states(b) == Counter({"ready@1": 2})
                assert any("rolled back to revision 1" in e for e in b.core.cluster.events["deployment/adder"])
            await assert_stored(b)
    run(test())


def test_a_rollout_past_its_progress_deadline_has_failed(tmp_path):
    async def test():
        async with brain(tmp_path) as b:
            rollout = "rollout: {progress_deadline_s: 30}"
            await started(b, adder(1, rollout=rollout))
            await b.apply(adder(1, cpu="200m", rollout=rollout))
            new = next(r for r in b.replicas() if r.revision == 2)
            record = b.core.cluster.deployments["adder"]
            b.core.cluster.deployments["adder"] = record.__class__(**{
                **record.__dict__, "rollout_started_unix_ms": record.rollout_started_unix_ms - 31_000})
            await follow(b, starting=frozenset({new.id}))      # never gets ready
            record = b.core.cluster.deployments["adder"]
            assert record.revision == 1 and "progress_deadline_s (30s)" in record.rollout_state
    run(test())
