"""Admin calls while the store is down: UNAVAILABLE naming the store, never INTERNAL with a traceback.

A real scheduler process on a real etcd that the test stops (issue 8, item 11).
"""

from __future__ import annotations

import grpc
import pytest
from mesh_harness import Admin, deployment_yaml

from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.scheduler import ctl

# The status interceptor's line for an exception it did not expect (runtime/status_interceptor.py).
UNEXPECTED = "unexpected error in /mesh.AdminService"


def test_admin_calls_while_etcd_is_down_answer_unavailable_naming_the_store(cluster, etcd, capsys):
    scheduler = cluster.scheduler(f"etcd://{etcd.endpoint}", "s1")
    admin = Admin(scheduler.address)
    admin.apply(deployment_yaml("adder", replicas=0))
    store_named = f"store etcd at {etcd.endpoint} unavailable"
    etcd.stop()

    # Changes on the leader: their fenced writes cannot reach etcd.
    for change in (lambda: admin.apply(deployment_yaml("other", replicas=1)),
                   lambda: admin.stub.Scale(mesh.ScaleRequest(name="adder", replicas=2), timeout=10)):
        with pytest.raises(grpc.RpcError) as refused:
            change()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        assert store_named in refused.value.details()
    # A refused change changed nothing, not even in the scheduler's memory.
    deployments = admin.stub.Get(mesh.GetRequest(kind="deployments"), timeout=10).deployments
    assert [(d.name, d.replicas) for d in deployments] == [("adder", 0)]

    # Once the lease is gone it no longer leads, and asking who does needs the store.
    def leader_call_fails():
        try:
            admin.leader()
        except grpc.RpcError as err:
            return err
        return None
    failed = admin.wait_for(leader_call_fails, "the Leader call to fail without etcd", timeout=30)
    assert failed.code() == grpc.StatusCode.UNAVAILABLE, failed
    assert store_named in failed.details()

    # What an operator sees: one line naming the store, exit 3 (retry later).
    code = ctl.main(["--server", scheduler.address, "get", "nodes"])
    err = capsys.readouterr().err
    assert code == ctl.EXIT_UNREACHABLE and store_named in err and "Traceback" not in err, err
    admin.close()
    log = "".join(scheduler.output)
    assert UNEXPECTED not in log and "Traceback" not in log, log[-4000:]
