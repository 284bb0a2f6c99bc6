"""A scheduler that stops leading ends every stream it serves, at once, naming the new leader (issue 8 item 1).

Component test: the real ``RouteService``/``AgentService`` on a grpc.aio server on 127.0.0.1:0 over a
``SchedulerCore`` on a real SQLite store. Integration test: two ``scheduler serve`` processes on a real
etcd, a route watcher and a node agent on the leader; the leader is paused (SIGSTOP) past its election
TTL, the standby takes over, and the paused one is resumed (SIGCONT).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time

import grpc
import pytest
from mesh_harness import ELECTION_TTL_S, START_TIMEOUT_S, Admin, Mesh, Process

from meshserve.common.leader import leader_named
from meshserve.common.status_interceptor import StatusInterceptor
from meshserve.node_agent.agent import CHANNEL_OPTIONS as AGENT_CHANNEL_OPTIONS
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc
from meshserve.scheduler.agent_service import AgentService
from meshserve.scheduler.core import SchedulerCore
from meshserve.scheduler.route_service import RouteService
from meshserve.scheduler.server import SchedulerOptions, SchedulerServer
from meshserve.scheduler.store.sqlite import SqliteStore
from meshserve.scheduler.writer import FencedWriter

# Bounds on a broken test, not performance claims.
STREAM_END_TIMEOUT_S = 5.0
# A resumed leader notices at once (its keep-alive deadline has passed); this bounds a loaded machine.
RESUMED_STEP_DOWN_TIMEOUT_S = 15.0
# An agent notices a silent scheduler within its keepalive (about 4 s) and registers elsewhere.
AGENT_MOVE_TIMEOUT_S = 30.0


def test_stepping_down_ends_route_watches_and_agent_streams_naming_the_new_leader(tmp_path):
    async def main():
        store = await SqliteStore.open(str(tmp_path / "state.db"))
        core = SchedulerCore(FencedWriter(store, lambda: None), scheduler_id="s1")
        core.cluster_id = "c0ffee"
        server = grpc.aio.server(interceptors=[StatusInterceptor()])
        mesh_grpc.add_RouteServiceServicer_to_server(RouteService(core), server)
        mesh_grpc.add_AgentServiceServicer_to_server(AgentService(core), server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            await core.start_leading(store)
            async with grpc.aio.insecure_channel(address) as channel:
                watch = mesh_grpc.RouteServiceStub(channel).WatchRoutes(mesh.WatchRoutesRequest())
                table = await watch.read()                      # the current table: the watch is open
                assert table.cluster_id == "c0ffee"              # a follower can tell a foreign cluster's table
                agent = mesh_grpc.AgentServiceStub(channel).Connect()
                await agent.write(mesh.AgentMessage(register=mesh.Register(node_name="node-a")))
                assert (await agent.read()).HasField("registered")

                core.leader_hint = "s2 at 127.0.0.1:7002"       # as the server learns it from the store
                await core.stop_leading()

                for call in (watch, agent):
                    with pytest.raises(grpc.aio.AioRpcError):
                        async with asyncio.timeout(STREAM_END_TIMEOUT_S):
                            while await call.read() is not grpc.aio.EOF:
                                pass
                    code, details = await call.code(), await call.details()
                    assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, details)
                    assert leader_named(code, details) == "127.0.0.1:7002", details
                # And a new watch is refused the same way.
                refused = mesh_grpc.RouteServiceStub(channel).WatchRoutes(mesh.WatchRoutesRequest())
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await refused.read()
                assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "s2 at 127.0.0.1:7002" in error.value.details()
        finally:
            await server.stop(0)
            await store.close()

    asyncio.run(asyncio.wait_for(main(), 30))


# Pings this often (gRPC sends them at most once a second) make a default gRPC server answer GOAWAY
# "too_many_pings" after about 3 s.
FAST_KEEPALIVE_MS = 300
IDLE_S = 6.0


def test_the_scheduler_accepts_keepalive_pings_on_an_idle_agent_stream(tmp_path):
    """Agents ping to notice a silent scheduler; the scheduler must not close them for pinging."""
    async def main():
        server = SchedulerServer(SchedulerOptions(listen="127.0.0.1:0", store_url=f"sqlite:///{tmp_path}/state.db",
                                                  scheduler_id="s1", election_ttl_s=2))
        await server.start()
        try:
            async with asyncio.timeout(STREAM_END_TIMEOUT_S):
                while not server.core.leading:  # noqa: ASYNC110 -- no event to await for the election's first win
                    await asyncio.sleep(0.05)
            options = dict(AGENT_CHANNEL_OPTIONS, **{"grpc.keepalive_time_ms": FAST_KEEPALIVE_MS})
            async with grpc.aio.insecure_channel(server.address, options=list(options.items())) as channel:
                call = mesh_grpc.AgentServiceStub(channel).Connect()
                await call.write(mesh.AgentMessage(register=mesh.Register(node_name="node-a")))
                registered = await call.read()
                assert registered.registered.cluster_id         # the store's identity, told to the agent
                await call.read()                               # its (empty) assignments
                reading = asyncio.ensure_future(call.read())    # nothing more comes: the stream stays open
                done, _ = await asyncio.wait({reading}, timeout=IDLE_S)
                assert not done, reading.exception() if reading.done() else None
                assert not call.done()
                call.cancel()
                await asyncio.gather(reading, return_exceptions=True)
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


class RouteWatcher:
    """A WatchRoutes stream read in a thread: its tables, and how and when it ended."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.call = mesh_grpc.RouteServiceStub(self.channel).WatchRoutes(mesh.WatchRoutesRequest())
        self.tables: list[mesh.RouteTable] = []
        self.first = threading.Event()
        self.ended = threading.Event()
        self.error: grpc.RpcError | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for table in self.call:
                self.tables.append(table)
                self.first.set()
        except grpc.RpcError as err:
            self.error = err
        self.ended.set()

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


def registered_with(agent, address: str, after: int = 0) -> bool:
    return any(f"registered with scheduler {address} " in line for line in agent.output[after:])


def wait_until(predicate, what: str, timeout: float, cluster: Mesh) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{cluster.logs()}")
        time.sleep(0.1)      # polling other processes' logs: there is no event to await


def leader_with_agent_and_watch(cluster: Mesh, etcd) -> tuple[Process, Process, Process]:
    """Two schedulers on ``etcd`` (s1 leads) and an agent registered with the leader."""
    store = f"etcd://{etcd.endpoint}"
    first = cluster.scheduler(store, "s1")
    second = cluster.scheduler(store, "s2", wait_leading=False)
    agent = cluster.agent("node-a", f"{first.address},{second.address}")
    wait_until(lambda: registered_with(agent, first.address), "the agent on the leader", START_TIMEOUT_S, cluster)
    return first, second, agent


def watch_routes(address: str) -> RouteWatcher:
    watcher = RouteWatcher(address)
    assert watcher.first.wait(START_TIMEOUT_S), "the watch got no table"
    return watcher


def test_a_paused_leader_ends_its_watches_on_resume_and_its_agent_moves_to_the_new_leader(cluster, etcd):
    first, second, agent = leader_with_agent_and_watch(cluster, etcd)
    watcher = watch_routes(first.address)
    try:
        mark = len(agent.output)
        first.pause()   # the mesh resumes it when the test ends, whatever happens
        standby = Admin(second.address)
        standby.wait_for(lambda: standby.leader().is_leader, "the standby to lead",
                         ELECTION_TTL_S + START_TIMEOUT_S, cluster)
        # The agent notices the silent leader by itself (keepalive) and registers with the new one.
        deadline = time.monotonic() + AGENT_MOVE_TIMEOUT_S
        while not (moved_while_paused := registered_with(agent, second.address, mark)):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)      # polling another process's log
        assert not watcher.ended.is_set()

        first.resume()
        assert watcher.ended.wait(RESUMED_STEP_DOWN_TIMEOUT_S), \
            f"the deposed leader kept its route watch open (agent moved while paused: {moved_while_paused})\n" \
            f"{cluster.logs()}"
        assert moved_while_paused, f"the agent stayed on the paused leader\n{cluster.logs()}"
        code, details = watcher.error.code(), watcher.error.details()
        assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, details)
        assert leader_named(code, details) == second.address, details

        # The watcher follows the leader the refusal named and gets its table there.
        follower = RouteWatcher(leader_named(code, details))
        try:
            assert follower.first.wait(START_TIMEOUT_S) and not follower.ended.is_set()
        finally:
            follower.close()
        nodes = {n.name: n.state for n in standby.nodes()}
        assert nodes == {"node-a": "ready"}
        # The resumed scheduler is a standby now and says who leads.
        resumed = Admin(first.address)
        assert resumed.wait_for(lambda: (r := resumed.leader()) and not r.is_leader and r.leader_id == "s2",
                                "the resumed scheduler to know s2 leads", START_TIMEOUT_S, cluster)
        resumed.close()
        standby.close()
        assert not re.search(r"Traceback", "".join(first.output + second.output))
    finally:
        watcher.close()


def test_an_etcd_outage_ends_the_leaders_watches_and_the_mesh_recovers_without_losing_a_node(cluster, etcd):
    first, second, agent = leader_with_agent_and_watch(cluster, etcd)
    watcher = watch_routes(first.address)
    try:
        etcd.stop()
        # The leader cannot renew its lease: after one TTL it steps down and ends its streams.
        assert watcher.ended.wait(ELECTION_TTL_S + RESUMED_STEP_DOWN_TIMEOUT_S), \
            f"the leader kept its route watch open without its store\n{cluster.logs()}"
        assert watcher.error.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE)

        mark = len(agent.output)
        etcd.start()
        admins = [Admin(first.address), Admin(second.address)]
        leader = admins[0].wait_for(lambda: next((p for p, a in zip((first, second), admins, strict=True)
                                                  if a.leader().is_leader), None),
                                    "a leader after the outage", START_TIMEOUT_S + ELECTION_TTL_S, cluster)
        wait_until(lambda: registered_with(agent, leader.address, mark), "the agent on the leader again",
                   AGENT_MOVE_TIMEOUT_S, cluster)
        follower = RouteWatcher(leader.address)
        try:
            assert follower.first.wait(START_TIMEOUT_S) and not follower.ended.is_set()
        finally:
            follower.close()
        assert {n.name: n.state for n in admins[0 if leader is first else 1].nodes()} == {"node-a": "ready"}
        assert not any("lost (silent" in line for line in first.output + second.output), cluster.logs()
        for admin in admins:
            admin.close()
    finally:
        watcher.close()
