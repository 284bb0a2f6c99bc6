"""An agent's report is a claim: a replica is routed only once the scheduler has seen it serve its model.

A real scheduler (in-process, SQLite, port 0) and a fake agent speaking
AgentService over gRPC: it registers as node "evil", takes the replica it is
assigned and reports it ready at its own address (a gRPC server of its own
that serves no model). That address must never reach the route table. The
same agent reporting the address of a real runtime serving the model gets it
routed: the check is not a blanket refusal.
"""

from __future__ import annotations

import asyncio

import grpc
from conftest import EXAMPLES, RuntimeProcess
from grpc_health.v1 import health, health_pb2_grpc
from mesh_harness import deployment_yaml

from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc
from meshserve.scheduler.records import READY, STARTING
from meshserve.scheduler.server import SchedulerOptions, SchedulerServer

GIB = 1 << 30
TEST_TIMEOUT_S = 60.0
WAIT_S = 20.0


def _register(node: str) -> mesh.AgentMessage:
    return mesh.AgentMessage(register=mesh.Register(
        node_name=node, host="127.0.0.1", gpu_source="fake",
        gpus=[mesh.GpuInfo(index=0, uuid=f"{node}-gpu0", memory_total_bytes=80 * GIB,
                           memory_free_bytes=80 * GIB)],
        resources=mesh.HostResources(cpu_cores=8, memory_total_bytes=64 * GIB, memory_available_bytes=64 * GIB)))


def _report(replica_id: str, address: str) -> mesh.AgentMessage:
    return mesh.AgentMessage(report=mesh.UsageReport(
        resources=mesh.HostResources(cpu_cores=8, memory_total_bytes=64 * GIB, memory_available_bytes=64 * GIB),
        replicas=[mesh.ReplicaStatus(replica_id=replica_id, state="ready", address=address)]))


async def _until(predicate, what: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not predicate():  # noqa: ASYNC110 -- the scheduler's state has no event to await from outside
            await asyncio.sleep(0.05)
    assert predicate(), what


def _routed(server: SchedulerServer) -> set[str]:
    return {e.address for route in server.core.route_table().routes for e in route.endpoints}


def test_a_rogue_agents_ready_report_at_its_own_address_is_never_routed(tmp_path):
    runtime = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(EXAMPLES), "--model", "add_sub"])

    async def main():
        server = SchedulerServer(SchedulerOptions(listen="127.0.0.1:0", store_url=f"sqlite:///{tmp_path}/state.db",
                                                  scheduler_id="s1", election_ttl_s=2))
        await server.start()
        rogue = grpc.aio.server()       # the rogue's own server: it answers, but serves no model
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), rogue)
        rogue_address = f"127.0.0.1:{rogue.add_insecure_port('127.0.0.1:0')}"
        await rogue.start()
        try:
            await _until(lambda: server.core.leading, "the scheduler to lead")
            async with grpc.aio.insecure_channel(server.address) as channel:
                await mesh_grpc.AdminServiceStub(channel).Apply(
                    mesh.ApplyRequest(spec_yaml=deployment_yaml("adder", 1)), timeout=10)
                call = mesh_grpc.AgentServiceStub(channel).Connect()
                await call.write(_register("evil"))
                replica_id = ""
                while not replica_id:
                    message = await call.read()
                    if message.WhichOneof("kind") == "assignments" and message.assignments.replicas:
                        replica_id = message.assignments.replicas[0].replica_id
                replica = server.core.cluster.replicas[replica_id]

                await call.write(_report(replica_id, rogue_address))
                await _until(lambda: replica.state == READY or replica.reason, "the claim to be decided")
                assert replica.state == STARTING
                assert rogue_address in replica.reason and "ModelReady" in replica.reason
                assert rogue_address not in _routed(server)
                await call.write(_report(replica_id, rogue_address))   # repeating the claim changes nothing
                await call.write(_report(replica_id, runtime.address))  # a replica that serves add_sub
                await _until(lambda: replica.state == READY, "the verified replica to be ready")
                assert _routed(server) == {runtime.address}
                call.cancel()
        finally:
            await rogue.stop(0)
            await server.stop()

    try:
        asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT_S))
    finally:
        runtime.stop()
