"""Through a real scheduler and agent (tests/mesh_harness.py): a deployment the host policy refuses shows
its reason in `get replicas` and `explain`, and an allowed one next to it serves.

(That a refusal starts no process and is not retried is shown report by report in
test_node_agent_policy_agent.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys

import grpc
import pytest
from mesh_harness import EXAMPLES, REPO_ROOT, RPC_TIMEOUT_S, Admin, Mesh

from meshserve.node_agent.policy import development_policy_yaml


@pytest.fixture
def mesh():
    mesh_ = Mesh()
    yield mesh_
    mesh_.close()


def _deployment(name: str, repository, extra: str = "") -> str:
    return f"""kind: Deployment
name: {name}
model: {{repository: "{repository}", name: add_sub}}
replicas: 1
resources: {{gpus: 0, cpu: 100m, memory: 512MiB}}   # enforced (node-agent --isolation): a runtime needs ~128MiB
{extra}"""


def test_refused_deployments_show_their_reason_in_get_replicas_and_explain(mesh, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(EXAMPLES / "add_sub", root / "models" / "add_sub")
    marker = tmp_path / "pwned"
    scheduler = mesh.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "policed")
    mesh.agent("node-a", scheduler.address, fake_gpus="1x24GiB", policy=development_policy_yaml(root))
    admin = Admin(scheduler.address)
    try:
        admin.apply(_deployment("good", root / "models"))
        admin.apply(_deployment("browser", root / "models", "env: {PYTHONWARNINGS: 'all:0:antigravity.x:0:0', "
                                f"BROWSER: \"/bin/sh -c 'id > {marker}' #%s\"}}\n"))
        admin.apply(_deployment("lis", root / "models",
                                f"runtime_args: [--model-repo, '{tmp_path}', --lis, '0.0.0.0:0']\n"))
        # The scheduler sees "/" and refuses it itself (no model add_sub there: issue 11); a real repository
        # outside the host's roots passes the scheduler and is the host's to refuse.
        with pytest.raises(grpc.RpcError) as refused:
            admin.apply(_deployment("slash", "/"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "deployments[0].model.name: no model 'add_sub' in the repository /" in refused.value.details()
        outside = tmp_path / "outside" / "models"
        shutil.copytree(EXAMPLES / "add_sub", outside / "add_sub")
        admin.apply(_deployment("slash", outside))

        def settled():
            replicas = {r.deployment: r for r in admin.replicas()}
            states = {name: replicas[name].state for name in ("good", "browser", "lis", "slash") if name in replicas}
            return replicas if states == {"good": "ready", "browser": "failed", "lis": "failed",
                                          "slash": "failed"} else None

        replicas = admin.wait_for(settled, "the good deployment ready and the refused ones failed", mesh_=mesh)
        expected = {"browser": "env 'BROWSER', 'PYTHONWARNINGS' are not allowed",
                    "lis": "runtime flag '--lis' is not allowed",
                    # the paths are long (tmp_path) and the reason cuts them: what it says about them stays
                    "slash": "is outside every allowed root"}
        for name, reason in expected.items():
            replica = replicas[name]
            assert replica.reason.startswith("refused by host policy: ") and reason in replica.reason, replica
            assert (replica.pid, replica.address, replica.restarts) == (0, "", 0)
            explained = "\n".join(admin.explain("replica", replica.id))
            assert reason in explained, explained

        table = subprocess.run([sys.executable, "-m", "meshserve.scheduler", "ctl", "--server", scheduler.address,
                                "get", "replicas"], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=RPC_TIMEOUT_S).stdout
        assert table.count("refused by host policy") == 3, table

        assert not marker.exists()
    finally:
        admin.close()
