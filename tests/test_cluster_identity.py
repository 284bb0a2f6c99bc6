"""A store has a cluster identity; agents refuse a scheduler of another cluster; a corrupt store is refused
(issue 8 item 3).

Unit: the cluster id on a real SQLite store, the agent's membership file. ``scheduler serve`` on a corrupt
SQLite file exits 1 saying so. Integration: an agent with a running replica, its scheduler restarted on an
empty store (``state.db`` truncated to 0 bytes): the agent refuses it and the replica keeps running.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from mesh_harness import REPO_ROOT, Admin, Mesh, deployment_yaml
from test_lost_node_grace import restart_scheduler

from meshserve.clients import InferenceClient
from meshserve.node_agent.membership import ClusterMembership, ForeignCluster
from meshserve.node_agent.process import pid_alive
from meshserve.scheduler.records import NodeRecord
from meshserve.scheduler.store import CorruptStore
from meshserve.scheduler.store.identity import CLUSTER_ID_KEY, ensure_cluster_id
from meshserve.scheduler.store.sqlite import SqliteStore

# Bounds on a broken test, not performance claims.
REFUSE_TIMEOUT_S = 60.0
SERVE_EXIT_TIMEOUT_S = 60.0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_a_store_gets_one_cluster_id_that_never_changes(tmp_path):
    async def main():
        store = await SqliteStore.open(str(tmp_path / "state.db"))
        first, second = await asyncio.gather(ensure_cluster_id(store), ensure_cluster_id(store))
        assert first == second and len(first) >= 16
        assert await ensure_cluster_id(store) == first
        await store.close()
        reopened = await SqliteStore.open(str(tmp_path / "state.db"))
        assert await ensure_cluster_id(reopened) == first
        await reopened.close()

        other = await SqliteStore.open(str(tmp_path / "other.db"))
        assert await ensure_cluster_id(other) != first       # another (empty) store: another cluster
        await other.close()
    run(main())


def test_a_store_from_before_cluster_ids_is_adopted_under_a_new_id(tmp_path):
    async def main():
        store = await SqliteStore.open(str(tmp_path / "state.db"))
        node = NodeRecord(name="node-a")
        await store.put(node.key, node.to_json())
        assert await store.get(CLUSTER_ID_KEY) is None
        cluster_id = await ensure_cluster_id(store)
        assert (await store.get(CLUSTER_ID_KEY)).value.decode() == cluster_id
        assert await store.get(node.key) is not None         # its state is kept
        await store.close()
    run(main())


def test_an_agent_remembers_the_first_cluster_and_refuses_any_other(tmp_path):
    path = tmp_path / "agent" / "node-a.json"
    membership = ClusterMembership(path)
    membership.check("s1:7070", "")                          # a scheduler from before cluster ids: accepted
    assert membership.cluster_id == "" and not path.exists()
    membership.check("s1:7070", "aaaa")
    membership.check("s1:7070", "aaaa")
    assert ClusterMembership(path).cluster_id == "aaaa"      # survives a restart
    with pytest.raises(ForeignCluster) as foreign:
        ClusterMembership(path).check("s2:7070", "bbbb")
    message = str(foreign.value)
    assert "bbbb" in message and "aaaa" in message and str(path) in message and "s2:7070" in message
    assert ClusterMembership(path).cluster_id == "aaaa"      # never replaced by itself

    path.write_text("{not json")
    with pytest.raises(RuntimeError, match="membership"):
        ClusterMembership(path)


def _corrupt(path: str) -> None:
    async def fill():
        store = await SqliteStore.open(path)
        for index in range(2000):
            await store.put(f"/meshserve/nodes/n{index}", b"x" * 200)
        await ensure_cluster_id(store)
        await store.close()
    run(fill())
    size = os.path.getsize(path)
    with open(path, "r+b") as file:                          # damage pages in the middle
        file.seek(size // 2)
        file.write(b"\xde\xad\xbe\xef" * 2048)


def test_a_corrupt_sqlite_store_is_refused_at_open(tmp_path):
    path = str(tmp_path / "state.db")
    _corrupt(path)
    with pytest.raises(CorruptStore, match="corrupt"):
        run(SqliteStore.open(path))
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all " * 500)
    with pytest.raises(CorruptStore, match="not a database"):
        run(SqliteStore.open(str(garbage)))


@pytest.mark.parametrize("damage", ["corrupt", "garbage"])
def test_scheduler_serve_on_a_corrupt_store_exits_nonzero_saying_so(tmp_path, damage):
    path = str(tmp_path / "state.db")
    if damage == "corrupt":
        _corrupt(path)
    else:
        (tmp_path / "state.db").write_bytes(os.urandom(64 * 1024))
    result = subprocess.run([sys.executable, "-m", "meshserve.scheduler", "serve", "--listen", "127.0.0.1:0",
                             "--store", f"sqlite:///{path}"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=SERVE_EXIT_TIMEOUT_S)
    assert result.returncode == 1, result.stdout + result.stderr
    assert path in result.stderr and "refusing to run on it" in result.stderr, result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_scheduler_on_an_empty_store_is_refused_and_replicas_keep_running(tmp_path):
    cluster = Mesh()
    try:
        path = tmp_path / "state.db"
        store = f"sqlite:///{path}"
        scheduler = cluster.scheduler(store, "s1")
        agent = cluster.agent("node-a", scheduler.address)
        admin = Admin(scheduler.address)
        admin.wait_for(lambda: [n for n in admin.nodes() if n.state == "ready"], "the node", mesh_=cluster)
        admin.apply(deployment_yaml("adder", replicas=1))
        replica = admin.wait_for(lambda: [r for r in admin.replicas("adder") if r.state == "ready"],
                                 "a ready replica", mesh_=cluster)[0]
        admin.close()

        assert scheduler.stop() == 0
        for suffix in ("-wal", "-shm"):
            if os.path.exists(f"{path}{suffix}"):
                os.remove(f"{path}{suffix}")
        os.truncate(path, 0)                                  # the "state.db truncated to 0 bytes"
        mark = len(agent.output)
        restarted = restart_scheduler(cluster, store, scheduler.address.rsplit(":", 1)[1])

        def refusals() -> int:
            return sum("belongs to cluster" in line for line in agent.output[mark:])
        deadline = time.monotonic() + REFUSE_TIMEOUT_S
        while refusals() < 3:                                 # refused, and again on each retry
            assert time.monotonic() < deadline, f"the agent did not refuse\n{cluster.logs()}"
            assert pid_alive(replica.pid), f"the replica was stopped\n{cluster.logs()}"
            time.sleep(0.1)                                   # polling another process's log
        errors = [line for line in agent.output[mark:] if "ERROR" in line and "belongs to cluster" in line]
        assert errors and "empty or wrong store" in errors[0], "".join(agent.output[mark:])
        assert pid_alive(replica.pid)
        assert not any("assignments version" in line for line in agent.output[mark:])
        a = np.arange(16, dtype=np.float32)[None, :]
        with InferenceClient(replica.address, timeout=10) as client:
            np.testing.assert_array_equal(client.infer("add_sub", {"INPUT0": a, "INPUT1": a})["OUTPUT0"], 2 * a)
        assert restarted.proc.poll() is None
    finally:
        cluster.close()
