"""The proxy's route source under faults (issue 8, item 1): a scheduler that goes silent is left.

A route source here is a REAL process (``FakeRoutes`` serving a fixed table
in a child Python), so ``kill -STOP`` freezes it the way a paused scheduler
is frozen: its TCP connection stays open, the kernel still accepts, nothing
answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT
from etcd_server import EtcdServer, require_etcd
from mesh_harness import ELECTION_TTL_S, Admin, Mesh
from test_proxy_helpers import RPC_TIMEOUT_S, FakeRoutes, LoopThread, route

from meshserve.common.backoff import Backoff
from meshserve.proxy import ProxyOptions, ProxyServer
from meshserve.proxy.follower import LIVENESS_INTERVAL_S, LIVENESS_TIMEOUT_S, RECONNECT_BACKOFF, RouteFollower
from meshserve.scheduler.core import DEFAULT_HEARTBEAT_TIMEOUT_S

_SERVE_ONE_TABLE = """
import asyncio, sys
from test_proxy_helpers import FakeRoutes, route

async def main(model):
    routes = FakeRoutes()
    await routes.start()
    await routes.publish(route(model, ("r-" + model, "127.0.0.1:1")))
    print("route source on", routes.address, flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1]))
"""
# Bounds the whole switch: detection (interval + timeout) plus a reconnect, with room for a loaded machine.
SWITCH_BOUND_S = 4 * (LIVENESS_INTERVAL_S + LIVENESS_TIMEOUT_S)


class RouteSourceProcess:
    """A child process serving one fixed route table naming ``model``."""

    def __init__(self, model: str):
        tests = str(REPO_ROOT / "tests")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVE_ONE_TABLE, model], cwd=tests, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), tests])},
        )
        line = self.proc.stdout.readline()
        match = re.search(r"route source on (\S+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"route source did not start: {line!r}")
        self.address = match.group(1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def loop():
    thread = LoopThread()
    yield thread
    thread.close()


def _models(proxy: ProxyServer) -> list[str]:
    table = proxy.routes
    return table.models() if table else []


def test_a_paused_route_source_is_left_for_a_live_one_within_a_bounded_time(loop):
    paused, live = RouteSourceProcess("from_paused"), RouteSourceProcess("from_live")

    async def start():
        proxy = ProxyServer(ProxyOptions(schedulers=[paused.address, live.address], listen="127.0.0.1:0"))
        await proxy.start()
        await proxy.wait_for_routes(RPC_TIMEOUT_S)
        return proxy
    proxy = loop.run(start())
    try:
        assert loop.call(_models, proxy) == ["from_paused"]
        paused.proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        while loop.call(_models, proxy) != ["from_live"] and time.monotonic() - stopped_at < SWITCH_BOUND_S:
            time.sleep(0.05)
        assert loop.call(_models, proxy) == ["from_live"], \
            f"still following the paused route source after {SWITCH_BOUND_S:.0f} s"
        assert proxy.follower.connected_to == live.address
        print(f"paused route source left after {time.monotonic() - stopped_at:.1f} s")
    finally:
        loop.run(proxy.stop(0))
        paused.stop()
        live.stop()


def test_a_paused_leader_scheduler_is_left_for_the_standby_once_it_leads(loop):
    """Two real schedulers on a real etcd; ``kill -STOP`` the leader: the proxy follows the new one."""
    require_etcd()
    etcd, cluster = EtcdServer().start(), Mesh()
    proxy = None
    try:
        store = f"etcd://{etcd.endpoint}"
        first = cluster.scheduler(store, "s1")
        second = cluster.scheduler(store, "s2", wait_leading=False)

        async def start():
            started = ProxyServer(ProxyOptions(schedulers=[first.address, second.address], listen="127.0.0.1:0"))
            await started.start()
            await started.wait_for_routes(RPC_TIMEOUT_S)
            return started
        proxy = loop.run(start())
        assert proxy.follower.connected_to == first.address
        first.proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        # The standby leads after the election TTL; then the proxy must be with it.
        bound = ELECTION_TTL_S + SWITCH_BOUND_S
        while proxy.follower.connected_to != second.address and time.monotonic() - stopped_at < bound:
            time.sleep(0.05)
        assert proxy.follower.connected_to == second.address, f"not with the new leader after {bound:.0f} s"
        admin = Admin(second.address)
        assert admin.leader().is_leader
        admin.close()
        print(f"paused leader left for the new one after {time.monotonic() - stopped_at:.1f} s")
    finally:
        if proxy is not None:
            loop.run(proxy.stop(0))
        for process in cluster.processes:
            process.proc.send_signal(signal.SIGCONT)
        cluster.close()
        etcd.cleanup()


def test_reconnect_backoff_is_capped_below_the_heartbeat_timeout_and_jittered():
    assert RECONNECT_BACKOFF.delay(100) < DEFAULT_HEARTBEAT_TIMEOUT_S
    delays = {RECONNECT_BACKOFF.delay(3) for _ in range(50)}
    assert len(delays) > 1, "reconnects of proxies restarted together would be in step"
    base = dataclasses.replace(RECONNECT_BACKOFF, jitter=0.0).delay(3)
    assert all(base / 2 <= d <= base for d in delays)


def test_a_scheduler_of_another_cluster_is_refused_and_the_last_table_stays():
    """A scheduler restarted on an empty or wrong store serves another cluster id: its (empty) table
    must never replace the routes the proxy serves from (issue 8, item 3)."""

    async def scenario():
        ours, foreign = FakeRoutes(cluster_id="cluster-a"), FakeRoutes(cluster_id="cluster-b")
        await ours.start()
        await foreign.start()
        await ours.publish(route("add_sub", ("r1", "127.0.0.1:1")))
        tables = []
        follower = RouteFollower([ours.address, foreign.address], tables.append,
                                 backoff=Backoff(initial_s=0.01, max_s=0.05))
        follower.start()
        try:
            async with asyncio.timeout(RPC_TIMEOUT_S):
                while not tables:  # noqa: ASYNC110 -- the follower's callback is synchronous
                    await asyncio.sleep(0.01)
                await ours.stop()  # our scheduler goes away; only the foreign one answers now
                while foreign.watch_calls < 3:  # noqa: ASYNC110 -- FakeRoutes counts calls, it signals none
                    await asyncio.sleep(0.01)
        finally:
            await follower.stop()
            await foreign.stop()
        assert follower.cluster_id == "cluster-a"
        assert tables and all(t.models() == ["add_sub"] for t in tables), [t.models() for t in tables]

    asyncio.run(scenario())
