"""Component tests of ``scheduler ctl`` against a fake AdminService.

The fake is a real gRPC server on 127.0.0.1:0 with canned, realistic nodes,
deployments and replicas; it records every request, so each test checks what
ctl sent as well as what it printed. ctl runs in-process through
``main([...])`` (capsys captures its output); one smoke test runs it as a
child process. Also here: unit tests of scheduler/output.py's cells.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
import yaml

from meshserve.common.artifacts import digest_folder
from meshserve.protos.mesh import control_pb2 as pb
from meshserve.protos.mesh import control_pb2_grpc as pb_grpc
from meshserve.scheduler import ctl, output
from meshserve.scheduler.spec import parse_deployments

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOYMENTS = REPO_ROOT / "examples" / "deployments"
MODELS = REPO_ROOT / "examples" / "models"
GIB = 2**30
NOW_MS = time.time_ns() // 1_000_000
# Ages chosen far from a unit boundary, so a slow run cannot change how they print.
ADD_SUB_CREATED_MS = NOW_MS - (45 * 60 + 10) * 1000            # "45m"
RESNET_CREATED_MS = NOW_MS - ((3 * 24 + 2) * 3600 + 600) * 1000  # "3d2h"
# Bounds a handler that a test keeps waiting; the test releases it sooner.
HANG_LIMIT_S = 10.0


@pytest.fixture(autouse=True)
def ctl_clock_at_import(monkeypatch):
    """ctl reads "now" when it prints ages; pin it to the moment the canned data was made, so ages do not
    move when this module runs minutes after it was imported (a full suite collects everything first)."""
    monkeypatch.setattr(ctl, "_now_unix_ms", lambda: NOW_MS)


def gpu(index: int, name: str, total_gib: float, used_gib: float, util: int, pids=()) -> pb.GpuInfo:
    total, used = int(total_gib * GIB), int(used_gib * GIB)
    return pb.GpuInfo(index=index, uuid=f"GPU-{index:04d}-{name.split()[-1].lower()}", name=name,
                      memory_total_bytes=total, memory_used_bytes=used, memory_free_bytes=total - used,
                      utilization_percent=util,
                      processes=[pb.GpuProcess(pid=p, used_memory_bytes=4 * GIB) for p in pids])


NODES = [
    pb.Node(name="gpu-1", host="10.0.0.11", state="ready", labels={"gpu": "h100", "zone": "a"}, gpu_source="nvml",
            gpus=[gpu(0, "NVIDIA H100 80GB HBM3", 80, 0.5, 0), gpu(1, "NVIDIA H100 80GB HBM3", 80, 4.5, 37, [2240])],
            resources=pb.HostResources(cpu_cores=64, memory_total_bytes=512 * GIB, memory_available_bytes=480 * GIB),
            last_seen_unix_ms=NOW_MS - 2000, replicas=2),
    pb.Node(name="gpu-2", host="10.0.0.12", state="ready", cordoned=True, labels={"gpu": "h100"}, gpu_source="nvml",
            gpus=[gpu(0, "NVIDIA H100 80GB HBM3", 80, 0.5, 0)], last_seen_unix_ms=NOW_MS - 1000, replicas=0),
    pb.Node(name="laptop", host="127.0.0.1", state="ready", gpu_source="fake",
            gpus=[gpu(0, "Fake GPU", 16, 1, 0), gpu(1, "Fake GPU", 16, 0, 0)],
            resources=pb.HostResources(cpu_cores=8, memory_total_bytes=32 * GIB, memory_available_bytes=20 * GIB),
            last_seen_unix_ms=NOW_MS - 500, replicas=1),
    pb.Node(name="cpu-1", host="10.0.0.20", state="lost", gpu_source="none", last_seen_unix_ms=NOW_MS - 95_000),
]

ADD_SUB_YAML = parse_deployments((DEPLOYMENTS / "add_sub.yaml").read_text(), base_dir=DEPLOYMENTS)[0].to_yaml()
DEPLOYMENTS_DATA = [
    pb.Deployment(name="add-sub", spec_yaml=ADD_SUB_YAML, replicas=2, ready_replicas=2, revision=3, model="add_sub",
                  created_unix_ms=ADD_SUB_CREATED_MS, revision_history=[1, 2]),
    pb.Deployment(name="resnet50-torch", spec_yaml="kind: Deployment\nname: resnet50-torch\n", replicas=2,
                  ready_replicas=0, revision=1, model="resnet50_torch", created_unix_ms=RESNET_CREATED_MS),
]

PENDING_REASON = ("no node fits: gpu-1: GPU 0 has 79.5GiB free but the deployment asks node_selector zone=b; "
                  "gpu-2: cordoned; laptop: no label gpu=h100")
REPLICAS = [
    pb.Replica(id="add-sub-7f9c2-0", deployment="add-sub", node="laptop", address="127.0.0.1:41001", pid=12345,
               state="ready", revision=3),
    pb.Replica(id="add-sub-7f9c2-1", deployment="add-sub", node="gpu-1", address="10.0.0.11:41002", pid=2231,
               state="ready", revision=3),
    pb.Replica(id="resnet50-torch-a1b2c-0", deployment="resnet50-torch", node="gpu-1", gpu_indices=[1],
               address="10.0.0.11:41003", pid=2240, state="starting", reason="loading model", revision=1,
               gpu_memory_bytes=4 * GIB),
    pb.Replica(id="resnet50-torch-a1b2c-1", deployment="resnet50-torch", state="pending", reason=PENDING_REASON,
               revision=1, gpu_memory_bytes=4 * GIB),
]

EXPLAIN_LINES = [
    "placed on gpu-1 GPU 1: needs 4.0GiB, 75.5GiB free; score 0.95 (pack: the GPU already runs a replica)",
    "gpu-2: filtered out: the node is cordoned",
    "laptop: filtered out: node_selector gpu=h100 does not match (labels: <none>)",
]


class FakeAdmin(pb_grpc.AdminServiceServicer):
    """AdminService with canned data; ``requests`` records (method, request) in arrival order."""

    def __init__(self, *, is_leader: bool = True, leader_address: str = "", leader_id: str = "sched-a"):
        self.requests: list[tuple[str, object]] = []
        self.is_leader, self.leader_address, self.leader_id = is_leader, leader_address, leader_id
        self.release = threading.Event()     # ends a handler that a deadline test keeps waiting
        self.hung_call_over = threading.Event()
        self.fail_on: tuple[str, grpc.StatusCode, str] | None = None   # (method, code, message), once
        self.hang_on: str | None = None      # the method whose next call waits for ``release``

    def _record(self, method: str, request, context) -> None:
        self.requests.append((method, request))
        if method == self.hang_on:
            self.hang_on = None
            self.release.wait(HANG_LIMIT_S)
            self.hung_call_over.set()
            return
        if self.fail_on and self.fail_on[0] == method:
            _, code, message = self.fail_on
            self.fail_on = None
            context.abort(code, message)

    def methods(self) -> list[str]:
        return [method for method, _ in self.requests]

    def Leader(self, request, context):
        self._record("Leader", request, context)
        return pb.LeaderResponse(is_leader=self.is_leader, leader_id=self.leader_id,
                                 leader_address=self.leader_address)

    def Apply(self, request, context):
        self._record("Apply", request, context)
        try:
            specs = parse_deployments(request.spec_yaml)
        except Exception as err:  # a real server maps SpecError the same way
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        existing = {d.name for d in DEPLOYMENTS_DATA}
        for spec in specs:
            if spec.name == "refused":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              'deployment "refused": model.repository: /nowhere is not a model repository on any node')
        dry = " (dry run)" if request.dry_run else ""
        return pb.ApplyResponse(applied=[f"deployment/{s.name} {'configured' if s.name in existing else 'created'}{dry}"
                                         for s in specs])

    def Get(self, request, context):
        self._record("Get", request, context)
        pools = {"nodes": (NODES, "name"), "deployments": (DEPLOYMENTS_DATA, "name"), "replicas": (REPLICAS, "id")}
        if request.kind not in pools:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"kind {request.kind!r}: use nodes, deployments or replicas")
        items, key = pools[request.kind]
        chosen = [item for item in items if not request.name or getattr(item, key) == request.name]
        return pb.GetResponse(**{request.kind: chosen})

    def Describe(self, request, context):
        self._record("Describe", request, context)
        if request.kind == "deployment":
            found = [d for d in DEPLOYMENTS_DATA if d.name == request.name]
            related = [r for r in REPLICAS if r.deployment == request.name]
            obj = pb.GetResponse(deployments=found, replicas=related)
        elif request.kind == "node":
            found = [n for n in NODES if n.name == request.name]
            obj = pb.GetResponse(nodes=found, replicas=[r for r in REPLICAS if r.node == request.name])
        elif request.kind == "replica":
            found = [r for r in REPLICAS if r.id == request.name]
            obj = pb.GetResponse(replicas=found)
        else:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot describe kind {request.kind!r}")
        if not found:
            context.abort(grpc.StatusCode.NOT_FOUND, f'{request.kind} "{request.name}" not found')
        return pb.DescribeResponse(object=obj, events=["scaled from 1 to 2 replicas",
                                                       "replica add-sub-7f9c2-1 ready on gpu-1"])

    def _deployment_must_exist(self, name: str, context) -> None:
        if name not in {d.name for d in DEPLOYMENTS_DATA}:
            context.abort(grpc.StatusCode.NOT_FOUND, f'deployment "{name}" not found')

    def _node_must_exist(self, name: str, context) -> None:
        if name not in {n.name for n in NODES}:
            context.abort(grpc.StatusCode.NOT_FOUND, f'node "{name}" not found')

    def Delete(self, request, context):
        self._record("Delete", request, context)
        self._deployment_must_exist(request.name, context)
        return pb.DeleteResponse()

    def DeleteNode(self, request, context):
        self._record("DeleteNode", request, context)
        self._node_must_exist(request.name, context)
        if request.name == "gpu-1" and not request.force:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "node 'gpu-1' holds 1 replica(s) (add-sub-7f9c2-1); drain it first, or force")
        held = [r.id for r in REPLICAS if r.node == request.name] if request.force else []
        return pb.DeleteNodeResponse(replicas=held)

    def Scale(self, request, context):
        self._record("Scale", request, context)
        self._deployment_must_exist(request.name, context)
        return pb.ScaleResponse()

    def Cordon(self, request, context):
        self._record("Cordon", request, context)
        self._node_must_exist(request.name, context)
        return pb.NodeResponse()

    def Uncordon(self, request, context):
        self._record("Uncordon", request, context)
        self._node_must_exist(request.name, context)
        return pb.NodeResponse()

    def Drain(self, request, context):
        self._record("Drain", request, context)
        self._node_must_exist(request.name, context)
        return pb.NodeResponse()

    def Explain(self, request, context):
        self._record("Explain", request, context)
        if request.name == "quiet":
            return pb.ExplainResponse()
        return pb.ExplainResponse(lines=EXPLAIN_LINES)


class NoLeaderRpc(FakeAdmin):
    """A scheduler that predates elections: Leader is UNIMPLEMENTED."""

    def Leader(self, request, context):
        self.requests.append(("Leader", request))
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")


class Served:
    def __init__(self, servicer: FakeAdmin):
        self.servicer = servicer
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_AdminServiceServicer_to_server(servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def stop(self) -> None:
        self.servicer.release.set()
        self.server.stop(grace=None)


@pytest.fixture(scope="module")
def served():
    started: list[Served] = []

    def start(servicer: FakeAdmin) -> Served:
        started.append(Served(servicer))
        return started[-1]

    yield start
    for item in started:
        item.stop()


@pytest.fixture(scope="module")
def leader_server(served):
    return served(FakeAdmin())


@pytest.fixture
def admin(leader_server):
    """The leader's fake, with a clean request log for this test."""
    fake = leader_server.servicer
    fake.requests.clear()
    fake.fail_on, fake.hang_on = None, None
    fake.release.clear()
    fake.hung_call_over.clear()
    fake.address = leader_server.address
    return fake


@pytest.fixture
def free_address():
    """An address where nothing listens (a port the kernel gave out and that was closed again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


def run_ctl(capsys, *argv: str) -> tuple[int, str, str]:
    code = ctl.main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def ctl_on(admin: FakeAdmin, capsys, *argv: str) -> tuple[int, str, str]:
    return run_ctl(capsys, "--server", admin.address, *argv)


def top_fields(text: str) -> dict[str, str]:
    """``Key:   value`` lines of describe output (not indented, value on the same line)."""
    pairs = (line.split(":", 1) for line in text.splitlines() if line[:1].strip() and not line.endswith(":"))
    return {key: value.strip() for key, value in pairs}


def request_of(admin: FakeAdmin, method: str):
    calls = [request for name, request in admin.requests if name == method]
    assert len(calls) == 1, admin.methods()
    return calls[0]


# ---------------------------------------------------------------- get


NODES_TABLE = """\
NAME     STATE            GPUS       GPU-MEMORY(FREE/TOTAL)   ALLOCATED(CPU/MEMORY/GPU-MEMORY)   SOURCE   REPLICAS   LABELS
gpu-1    ready            2          155.0/160.0GiB           0/64, 0.0/512.0GiB, 0.0/160.0GiB   nvml     2          gpu=h100,zone=a
gpu-2    ready,cordoned   1          79.5/80.0GiB             0/0, 0.0/0.0GiB, 0.0/80.0GiB       nvml     0          gpu=h100
laptop   ready            2 (fake)   31.0/32.0GiB             0/8, 0.0/32.0GiB, 0.0/32.0GiB      fake     1          <none>
cpu-1    lost             0          -                        0/0, 0.0/0.0GiB, 0.0/0.0GiB        none     0          <none>
"""

DEPLOYMENTS_TABLE = """\
NAME             MODEL            READY/DESIRED   REVISION   DIGEST   AGE
add-sub          add_sub          2/2             3          -        45m
resnet50-torch   resnet50_torch   0/2             1          -        3d2h
"""

REPLICAS_TABLE = """\
NAME                     DEPLOYMENT       REVISION   NODE     GPU   ADDRESS           PID     STATE      RESTARTS   REASON
add-sub-7f9c2-0          add-sub          3          laptop   -     127.0.0.1:41001   12345   ready      0          -
add-sub-7f9c2-1          add-sub          3          gpu-1    -     10.0.0.11:41002   2231    ready      0          -
resnet50-torch-a1b2c-0   resnet50-torch   1          gpu-1    1     10.0.0.11:41003   2240    starting   0          loading model
resnet50-torch-a1b2c-1   resnet50-torch   1          -        -     -                 -       pending    0          no node fits: gpu-1: GPU 0 has 79.5GiB free but the deplo...
"""


@pytest.mark.parametrize("kind, expected", [
    ("nodes", NODES_TABLE), ("deployments", DEPLOYMENTS_TABLE), ("replicas", REPLICAS_TABLE),
])
def test_get_tables(admin, capsys, kind, expected):
    code, out, err = ctl_on(admin, capsys, "get", kind)
    assert (code, err) == (0, "")
    assert out == expected
    assert admin.methods() == ["Leader", "Get"]
    assert request_of(admin, "Get") == pb.GetRequest(kind=kind, name="")


@pytest.mark.parametrize("word, kind", [("node", "nodes"), ("no", "nodes"), ("deploy", "deployments"),
                                        ("deployment", "deployments"), ("replica", "replicas")])
def test_get_accepts_kind_aliases_and_sends_the_plural(admin, capsys, word, kind):
    code, _, _ = ctl_on(admin, capsys, "get", word)
    assert code == 0
    assert request_of(admin, "Get").kind == kind


def test_get_one_by_name(admin, capsys):
    code, out, _ = ctl_on(admin, capsys, "get", "deployments", "add-sub")
    assert code == 0
    assert request_of(admin, "Get") == pb.GetRequest(kind="deployments", name="add-sub")
    assert out == ("NAME      MODEL     READY/DESIRED   REVISION   DIGEST   AGE\n"
                   "add-sub   add_sub   2/2             3          -        45m\n")
    code, out, _ = ctl_on(admin, capsys, "get", "node/gpu-2")
    assert code == 0 and out.splitlines()[1].startswith("gpu-2 ")


def test_get_a_missing_name_is_not_found(admin, capsys):
    code, out, err = ctl_on(admin, capsys, "get", "deployment", "nope")
    assert (code, out, err) == (1, "", 'error: deployment "nope" not found\n')


def test_get_json(admin, capsys):
    code, out, _ = ctl_on(admin, capsys, "-o", "json", "get", "nodes")
    assert code == 0
    data = json.loads(out)
    assert list(data) == ["nodes"]
    gpu1, gpu2, laptop, cpu1 = data["nodes"]
    assert gpu1["name"] == "gpu-1" and gpu1["labels"] == {"gpu": "h100", "zone": "a"}
    assert gpu1["gpus"][1]["memory_total_bytes"] == 80 * GIB          # a number, not a string
    assert gpu1["gpus"][1]["processes"] == [{"pid": 2240, "used_memory_bytes": 4 * GIB}]
    assert gpu2["cordoned"] is True and gpu1["cordoned"] is False       # every field present
    assert laptop["gpu_source"] == "fake"
    assert cpu1["gpus"] == [] and cpu1["state"] == "lost"


def test_get_yaml_with_the_option_after_the_verb(admin, capsys):
    code, out, _ = ctl_on(admin, capsys, "get", "replicas", "-o", "yaml")
    assert code == 0
    data = yaml.safe_load(out)
    assert [r["id"] for r in data["replicas"]] == [r.id for r in REPLICAS]
    assert data["replicas"][2]["gpu_indices"] == [1]
    assert data["replicas"][3]["reason"] == PENDING_REASON     # whole, not cut as in the table
    assert list(data["replicas"][3]) == [field.name for field in pb.Replica.DESCRIPTOR.fields]   # .proto order


def test_get_deployments_json_has_the_applied_spec(admin, capsys):
    code, out, _ = ctl_on(admin, capsys, "get", "deployments", "-o", "json")
    assert code == 0
    add_sub = json.loads(out)["deployments"][0]
    assert add_sub["revision_history"] == [1, 2] and add_sub["created_unix_ms"] == ADD_SUB_CREATED_MS
    assert parse_deployments(add_sub["spec_yaml"])[0].name == "add-sub"


def test_get_an_empty_list(admin, capsys, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPLICAS", [])
    code, out, err = ctl_on(admin, capsys, "get", "replicas")
    assert (code, out, err) == (0, "", "No replicas found.\n")
    code, out, _ = ctl_on(admin, capsys, "get", "replicas", "-o", "json")
    assert json.loads(out) == {"replicas": []}


def test_get_an_unknown_kind_is_a_usage_error_with_no_call(admin, capsys):
    code, out, err = ctl_on(admin, capsys, "get", "pods")
    assert (code, out) == (2, "")
    assert err == "error: unknown kind 'pods' here (use node or deployment or replica)\n"
    assert admin.requests == []


# ---------------------------------------------------------------- describe


def test_describe_deployment(admin, capsys):
    code, out, _ = ctl_on(admin, capsys, "describe", "deployment", "add-sub")
    assert code == 0
    assert request_of(admin, "Describe") == pb.DescribeRequest(kind="deployment", name="add-sub")
    lines = out.splitlines()
    assert lines[:6] == ["Name:     add-sub", "Model:    add_sub", "Replicas: 2 desired, 2 ready", "Revision: 3",
                         "Digest:   <none>", "History:  1, 2"]
    assert lines[6].startswith("Created:  ") and lines[6].endswith(" UTC (45m ago)")
    assert "Spec:" in lines and "  kind: Deployment" in lines and f"    repository: {MODELS}" in lines
    at = lines.index("Replicas of add-sub:")
    assert lines[at + 1].split() == ["NAME", "DEPLOYMENT", "REVISION", "NODE", "GPU", "ADDRESS", "PID", "STATE",
                                     "RESTARTS", "REASON"]
    assert lines[at + 2].split()[:4] == ["add-sub-7f9c2-0", "add-sub", "3", "laptop"]
    assert lines[-3:] == ["Events:", "  scaled from 1 to 2 replicas", "  replica add-sub-7f9c2-1 ready on gpu-1"]


def test_describe_node_shows_each_gpu(admin, capsys):
    code, out, _ = ctl_on(admin, capsys, "describe", "node/gpu-1")
    assert code == 0
    assert request_of(admin, "Describe") == pb.DescribeRequest(kind="node", name="gpu-1")
    lines = out.splitlines()
    fields = top_fields(out)
    assert fields["State"] == "ready" and fields["Labels"] == "gpu=h100,zone=a" and fields["Host"] == "10.0.0.11"
    assert fields["Memory"] == "480.0GiB available of 512.0GiB" and re.fullmatch(r"\S+ \S+ UTC \(\d+s ago\)", fields["Last seen"])
    at = lines.index("GPUs:")
    assert lines[at + 1].split() == ["INDEX", "NAME", "MEMORY(USED/TOTAL)", "FREE", "UTIL", "PROCESSES", "UUID"]
    assert lines[at + 3].split() == ["1", "NVIDIA", "H100", "80GB", "HBM3", "4.5/80.0GiB", "75.5GiB", "37%", "2240",
                                     "GPU-0001-hbm3"]
    assert "Replicas on gpu-1:" in lines


def test_describe_fake_node_says_so(admin, capsys):
    code, out, _ = ctl_on(admin, capsys, "describe", "node", "laptop")
    assert code == 0
    assert top_fields(out)["GPU source"] == "fake (not real GPUs)"


def test_describe_replica_shows_the_whole_reason(admin, capsys):
    code, out, _ = ctl_on(admin, capsys, "describe", "replica", "resnet50-torch-a1b2c-1")
    assert code == 0
    lines = out.splitlines()
    fields = top_fields(out)
    assert (fields["State"], fields["GPU memory"], fields["Node"], fields["PID"]) == ("pending", "4.0GiB", "-", "-")
    assert lines[lines.index("Reason:") + 1] == "  " + PENDING_REASON


def test_describe_yaml(admin, capsys):
    code, out, _ = ctl_on(admin, capsys, "describe", "deployment", "add-sub", "-o", "yaml")
    assert code == 0
    data = yaml.safe_load(out)
    assert data["object"]["deployments"][0]["name"] == "add-sub"
    assert data["events"][0] == "scaled from 1 to 2 replicas"


def test_describe_not_found_uses_the_servers_message(admin, capsys):
    code, out, err = ctl_on(admin, capsys, "describe", "deployment", "nope")
    assert (code, out, err) == (1, "", 'error: deployment "nope" not found\n')


def test_describe_needs_a_name(admin, capsys):
    code, _, err = ctl_on(admin, capsys, "describe", "deployment")
    assert code == 2 and err == "error: which deployment? give its name: deployment NAME\n"
    assert admin.requests == []


# ---------------------------------------------------------------- delete, scale, nodes


def test_delete(admin, capsys):
    code, out, err = ctl_on(admin, capsys, "delete", "deployment", "add-sub")
    assert (code, out, err) == (0, "deployment/add-sub deleted\n", "")
    assert request_of(admin, "Delete") == pb.DeleteRequest(kind="deployment", name="add-sub")


def test_delete_json_and_missing(admin, capsys):
    code, out, _ = ctl_on(admin, capsys, "-o", "json", "delete", "deploy/add-sub")
    assert code == 0
    assert json.loads(out) == {"kind": "deployment", "name": "add-sub", "result": "deleted"}
    code, out, err = ctl_on(admin, capsys, "delete", "deployment", "ghost")
    assert (code, out, err) == (1, "", 'error: deployment "ghost" not found\n')


def test_delete_only_deployments_and_nodes(admin, capsys):
    code, _, err = ctl_on(admin, capsys, "delete", "replica", "add-sub-7f9c2-1")
    assert code == 2 and err == "error: unknown kind 'replica' here (use deployment or node)\n"
    code, _, err = ctl_on(admin, capsys, "delete", "deployment", "add-sub", "--force")
    assert code == 2 and err == "error: --force applies to `delete node` only\n"
    assert admin.requests == []


def test_delete_node_that_is_gone(admin, capsys):
    code, out, err = ctl_on(admin, capsys, "delete", "node", "gpu-2")
    assert (code, out, err) == (0, "node/gpu-2 deleted\n", "")
    assert request_of(admin, "DeleteNode") == pb.DeleteNodeRequest(name="gpu-2", force=False)


def test_delete_node_refused_while_it_holds_replicas_then_forced(admin, capsys):
    code, out, err = ctl_on(admin, capsys, "delete", "node/gpu-1")
    assert (code, out) == (1, "") and err.startswith("error: node 'gpu-1' holds 1 replica(s)")
    code, out, err = ctl_on(admin, capsys, "delete", "node", "gpu-1", "--force")
    assert (code, err) == (0, "")
    assert out == "node/gpu-1 deleted; its replicas are placed again: add-sub-7f9c2-1, resnet50-torch-a1b2c-0\n"
    assert [r.force for m, r in admin.requests if m == "DeleteNode"] == [False, True]
    code, out, _ = ctl_on(admin, capsys, "-o", "json", "delete", "node", "gpu-1", "--force")
    assert json.loads(out) == {"kind": "node", "name": "gpu-1", "result": "deleted",
                               "replicas": ["add-sub-7f9c2-1", "resnet50-torch-a1b2c-0"]}
    code, out, err = ctl_on(admin, capsys, "delete", "node", "nowhere")
    assert (code, out, err) == (1, "", 'error: node "nowhere" not found\n')


@pytest.mark.parametrize("target", [["add-sub"], ["deployment/add-sub"], ["deployment", "add-sub"]])
def test_scale(admin, capsys, target):
    code, out, err = ctl_on(admin, capsys, "scale", *target, "--replicas", "3")
    assert (code, out, err) == (0, "deployment/add-sub scaled\n", "")
    assert request_of(admin, "Scale") == pb.ScaleRequest(name="add-sub", replicas=3)


def test_scale_yaml_and_to_zero(admin, capsys):
    code, out, _ = ctl_on(admin, capsys, "scale", "add-sub", "--replicas", "0", "-o", "yaml")
    assert code == 0
    assert yaml.safe_load(out) == {"kind": "deployment", "name": "add-sub", "result": "scaled", "replicas": 0}
    assert request_of(admin, "Scale").replicas == 0


@pytest.mark.parametrize("count", ["-1", "two", "100000"])
def test_scale_refuses_a_bad_count_before_calling(admin, capsys, count):
    code, out, err = ctl_on(admin, capsys, "scale", "add-sub", "--replicas", count)
    assert code == 2 and out == ""
    assert "--replicas" in err and "usage:" in err
    assert admin.requests == []


@pytest.mark.parametrize("verb, method, result", [
    ("cordon", "Cordon", "cordoned"), ("uncordon", "Uncordon", "uncordoned"), ("drain", "Drain", "draining"),
])
def test_node_verbs(admin, capsys, verb, method, result):
    code, out, err = ctl_on(admin, capsys, verb, "gpu-2")
    assert (code, out, err) == (0, f"node/gpu-2 {result}\n", "")
    assert request_of(admin, method) == pb.NodeRequest(name="gpu-2")
    code, out, err = ctl_on(admin, capsys, verb, "node/nowhere")
    assert (code, out, err) == (1, "", 'error: node "nowhere" not found\n')


# ---------------------------------------------------------------- explain


def test_explain_replica(admin, capsys):
    code, out, err = ctl_on(admin, capsys, "explain", "replica", "resnet50-torch-a1b2c-0")
    assert (code, err) == (0, "")
    assert out == "".join(line + "\n" for line in EXPLAIN_LINES)
    assert request_of(admin, "Explain") == pb.ExplainRequest(kind="replica", name="resnet50-torch-a1b2c-0")


def test_explain_deployment_json(admin, capsys):
    code, out, _ = ctl_on(admin, capsys, "explain", "deployment/add-sub", "-o", "json")
    assert code == 0
    assert json.loads(out) == {"lines": EXPLAIN_LINES}
    assert request_of(admin, "Explain").kind == "deployment"


def test_explain_with_nothing_recorded(admin, capsys):
    code, out, err = ctl_on(admin, capsys, "explain", "replica", "quiet")
    assert (code, out, err) == (0, "", "No decisions recorded for replica/quiet.\n")


def test_explain_only_replicas_and_deployments(admin, capsys):
    code, _, err = ctl_on(admin, capsys, "explain", "node", "gpu-1")
    assert code == 2 and "use replica or deployment" in err


# ---------------------------------------------------------------- apply


def test_apply_one_file_sends_the_canonical_spec(admin, capsys):
    path = DEPLOYMENTS / "add_sub.yaml"
    code, out, err = ctl_on(admin, capsys, "apply", "-f", str(path))
    assert (code, out, err) == (0, "deployment/add-sub configured\n", "")
    request = request_of(admin, "Apply")
    assert request.dry_run is False
    [sent] = parse_deployments(request.spec_yaml)
    written = parse_deployments(path.read_text(), base_dir=DEPLOYMENTS)[0]
    # The model folder is on this machine: its content digest is pinned, so a changed model is a new revision.
    assert sent == written.replace(model=dataclasses.replace(written.model,
                                                             digest=digest_folder(MODELS / "add_sub")))
    assert sent.model.repository == str(MODELS)         # resolved against the file's folder


def test_apply_a_folder_in_one_request(admin, capsys):
    code, out, _ = ctl_on(admin, capsys, "apply", "-f", str(DEPLOYMENTS), "--dry-run")
    assert code == 0
    assert out == ("deployment/add-sub configured (dry run)\ndeployment/mlp-onnx created (dry run)\n"
                   "deployment/resnet50-torch configured (dry run)\ndeployment/textgen created (dry run)\n")
    request = request_of(admin, "Apply")
    assert request.dry_run is True
    assert [s.name for s in parse_deployments(request.spec_yaml)] == ["add-sub", "mlp-onnx", "resnet50-torch",
                                                                       "textgen"]


def test_apply_from_stdin_resolves_against_the_working_directory(admin, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(MODELS / "add_sub", tmp_path / "models" / "add_sub")   # ctl checks the model's files
    monkeypatch.setattr(sys, "stdin", io.StringIO("kind: Deployment\nname: new-one\n"
                                                  "model: {repository: models, name: add_sub}\n"))
    code, out, _ = ctl_on(admin, capsys, "apply", "-f", "-", "-o", "json")
    assert code == 0
    assert json.loads(out) == {"applied": ["deployment/new-one created"]}
    [sent] = parse_deployments(request_of(admin, "Apply").spec_yaml)
    assert sent.model.repository == str(tmp_path / "models")


def test_apply_with_a_local_spec_error_makes_no_call(admin, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((DEPLOYMENTS / "resnet50_torch.yaml").read_text().replace("gpu_memory: 4GiB", "gpu_memory: 4Gx"))
    code, out, err = ctl_on(admin, capsys, "apply", "-f", str(bad))
    assert (code, out) == (1, "")
    assert err == (f'error: {bad}: deployments[0].resources.gpu_memory: "4Gx" is not a size '
                   f"(use e.g. 40GiB, 512MiB)\n")
    assert admin.requests == []


def test_apply_lists_every_problem_of_every_file(admin, capsys, tmp_path):
    (tmp_path / "a.yaml").write_text("kind: Deployment\nname: A\nmodel: {repository: r, name: m}\nreplicas: -1\n")
    (tmp_path / "b.yml").write_text("kind: Deployment\nname: b\nmodel: {repository: r, name: m}\n")
    (tmp_path / "c.yaml").write_text("kind: Deployment\nname: b\nmodel: {repository: r, name: m}\n")
    code, out, err = ctl_on(admin, capsys, "apply", "-f", str(tmp_path))
    assert (code, out) == (1, "")
    a, b, c = (tmp_path / name for name in ("a.yaml", "b.yml", "c.yaml"))
    assert err.splitlines() == [
        "error: 4 problems; nothing was applied:",
        f'  {a}: deployments[0].name: "A" is not a valid name (lowercase letters, digits and \'-\', '
        "starting and ending with a letter or digit, at most 63 characters)",
        f"  {a}: deployments[0].replicas: -1 is negative (use 0 or more)",
        f"  {b}: deployments[0].model.repository: {tmp_path / 'r'}: no such folder",
        f'  {c}: deployments[0].name: "b" is also in {b}',
        "  (a repository that is only on the serving hosts: apply with --files-on-nodes; "
        "each host then checks it when the replica loads)",
    ]
    assert admin.requests == []


def test_apply_a_missing_file(admin, capsys, tmp_path):
    code, _, err = ctl_on(admin, capsys, "apply", "-f", str(tmp_path / "none.yaml"))
    assert code == 1 and err == f"error: cannot read {tmp_path / 'none.yaml'}: No such file or directory\n"
    assert admin.requests == []


def test_apply_refused_by_the_server_shows_its_message(admin, capsys, tmp_path):
    spec = tmp_path / "refused.yaml"
    spec.write_text("kind: Deployment\nname: refused\nmodel: {repository: /nowhere, name: m}\n")
    code, out, err = ctl_on(admin, capsys, "apply", "-f", str(spec), "--files-on-nodes")  # not checked here
    assert (code, out) == (1, "")
    assert err == 'error: deployment "refused": model.repository: /nowhere is not a model repository on any node\n'


def test_a_multi_line_server_error_is_indented(admin, capsys):
    admin.fail_on = ("Get", grpc.StatusCode.INVALID_ARGUMENT, "deployments[0].replicas: bad\ndeployments[1].name: bad")
    code, _, err = ctl_on(admin, capsys, "get", "nodes")
    assert code == 1 and err == "error: deployments[0].replicas: bad\n  deployments[1].name: bad\n"


# ---------------------------------------------------------------- finding the leader, failures


def test_leader_discovery_skips_a_standby(served, admin, capsys):
    standby = served(FakeAdmin(is_leader=False, leader_address=admin.address, leader_id="sched-a"))
    code, out, _ = run_ctl(capsys, "--server", f"{standby.address},{admin.address}", "get", "deployments")
    assert (code, out) == (0, DEPLOYMENTS_TABLE)
    assert set(standby.servicer.methods()) <= {"Leader"}     # asked at most who leads (the leader may answer first)
    assert admin.methods() == ["Leader", "Get"]


def test_a_standby_alone_leads_to_the_leader_it_names(served, admin, capsys):
    standby = served(FakeAdmin(is_leader=False, leader_address=admin.address))
    code, _, _ = run_ctl(capsys, "--server", standby.address, "scale", "add-sub", "--replicas", "2")
    assert code == 0
    assert standby.servicer.methods() == ["Leader"]
    assert admin.methods() == ["Scale"]


def test_an_unreachable_scheduler_is_skipped(admin, capsys, free_address):
    code, out, _ = run_ctl(capsys, "--server", f"{free_address},{admin.address}", "get", "nodes")
    assert (code, out) == (0, NODES_TABLE)


def test_standbys_without_a_leader(served, capsys):
    lonely = served(FakeAdmin(is_leader=False, leader_address=""))
    code, out, err = run_ctl(capsys, "--server", lonely.address, "get", "nodes")
    assert (code, out) == (3, "")
    assert err == (f"error: no scheduler leader: {lonely.address} is a standby and no leader is elected yet; "
                   "retry in a few seconds\n")


def test_a_scheduler_whose_leader_rpc_fails(served, capsys):
    broken = served(FakeAdmin())
    broken.servicer.fail_on = ("Leader", grpc.StatusCode.UNKNOWN, "Exception calling application: boom")
    code, out, err = run_ctl(capsys, "--server", broken.address, "get", "nodes")
    assert (code, out) == (1, "")
    assert err == (f"error: the scheduler at {broken.address} (UNKNOWN: Exception calling application: boom) "
                   "failed to say which scheduler leads; see its log\n")
    assert broken.servicer.methods() == ["Leader"]


def test_a_scheduler_without_the_leader_rpc_is_the_leader(served, capsys):
    single = served(NoLeaderRpc())
    code, out, _ = run_ctl(capsys, "--server", single.address, "get", "deployments")
    assert (code, out) == (0, DEPLOYMENTS_TABLE)
    assert single.servicer.methods() == ["Leader", "Get"]


def test_an_address_that_is_not_a_scheduler(capsys):
    other = grpc.server(futures.ThreadPoolExecutor(max_workers=1))   # a gRPC server without AdminService
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        code, out, err = run_ctl(capsys, "--server", f"127.0.0.1:{port}", "get", "nodes")
    finally:
        other.stop(grace=None)
    assert (code, out) == (3, "")
    assert err == (f"error: the server at 127.0.0.1:{port} does not serve the scheduler's admin API "
                   "(Method not found!); is it a scheduler's address?\n")


def test_a_leader_is_preferred_to_a_server_without_the_leader_rpc(served, admin, capsys):
    single = served(NoLeaderRpc())
    code, _, _ = run_ctl(capsys, "--server", f"{single.address},{admin.address}", "get", "nodes")
    assert code == 0
    assert set(single.servicer.methods()) <= {"Leader"} and admin.methods() == ["Leader", "Get"]


def test_unreachable_scheduler(capsys, free_address):
    code, out, err = run_ctl(capsys, "--server", free_address, "get", "nodes")
    assert (code, out) == (3, "")
    assert err == (f"error: cannot reach the scheduler at {free_address} (connection refused); "
                   "is `scheduler serve` running?\n")


def test_several_unreachable_schedulers(capsys, free_address):
    other = free_address.rsplit(":", 1)[0] + ":1"
    code, _, err = run_ctl(capsys, "--server", f"{free_address}, {other}", "get", "nodes")
    assert code == 3
    assert err == (f"error: cannot reach any scheduler at {free_address} (connection refused), "
                   f"{other} (connection refused); is `scheduler serve` running?\n")


def test_server_from_the_environment(admin, capsys, monkeypatch):
    monkeypatch.setenv(ctl.SERVER_ENV, admin.address)
    code, out, _ = run_ctl(capsys, "get", "nodes")
    assert (code, out) == (0, NODES_TABLE)


def test_no_answer_in_time(admin, capsys):
    admin.hang_on = "Get"
    try:
        code, out, err = ctl_on(admin, capsys, "--timeout", "0.3", "get", "nodes")
    finally:
        admin.release.set()
    assert admin.hung_call_over.wait(HANG_LIMIT_S)     # no handler left running into the next test
    assert (code, out) == (3, "")
    assert err == f"error: the scheduler at {admin.address} did not answer Get in 0.3s (a longer --timeout may help)\n"


def test_an_internal_error(admin, capsys):
    admin.fail_on = ("Get", grpc.StatusCode.INTERNAL, "store: database is locked")
    code, _, err = ctl_on(admin, capsys, "get", "nodes")
    assert code == 1 and err == "error: the scheduler failed (INTERNAL): store: database is locked\n"


def test_a_scheduler_whose_store_is_down_is_unavailable_not_unreachable(admin, capsys):
    """The store's words embed a transport failure ("connection refused"): still the scheduler answered."""
    store_down = ("store etcd at 127.0.0.1:2379 unavailable: txn: failed to connect to all addresses; "
                  "last error: UNKNOWN: ipv4:127.0.0.1:2379: Failed to connect to remote host: Connection refused")
    admin.fail_on = ("Scale", grpc.StatusCode.UNAVAILABLE, store_down)
    code, _, err = ctl_on(admin, capsys, "scale", "add-sub", "--replicas", "2")
    assert (code, err) == (3, f"error: the scheduler at {admin.address} is unavailable: {store_down}\n")


def test_a_failed_precondition_is_the_servers_message(admin, capsys):
    admin.fail_on = ("Get", grpc.StatusCode.FAILED_PRECONDITION, 'node "cpu-1" is lost; it cannot be drained')
    code, _, err = ctl_on(admin, capsys, "get", "nodes")
    assert code == 1 and err == 'error: node "cpu-1" is lost; it cannot be drained\n'


# ---------------------------------------------------------------- command line


def test_help_and_usage_errors(capsys):
    code, out, _ = run_ctl(capsys, "--help")
    assert code == 0 and "apply" in out and "explain" in out
    code, _, err = run_ctl(capsys)
    assert code == 2 and "usage: scheduler ctl" in err
    code, _, err = run_ctl(capsys, "-o", "xml", "get", "nodes")
    assert code == 2 and "invalid choice: 'xml'" in err
    code, _, err = run_ctl(capsys, "--timeout", "0", "get", "nodes")
    assert code == 2 and "more than 0 seconds" in err


def test_mounts_under_another_cli(admin, capsys):
    top = argparse.ArgumentParser(prog="scheduler")
    commands = top.add_subparsers(dest="command", required=True)
    ctl.build_parser(commands)
    args = top.parse_args(["ctl", "--server", admin.address, "get", "nodes", "-o", "json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["nodes"][0]["name"] == "gpu-1"


def test_smoke_as_a_process(admin, free_address):
    command = [sys.executable, "-m", "meshserve.scheduler.ctl", "--server", admin.address, "get", "deployments"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    # A process reads its own clock: the canned add-sub age (45m at import) grows while the suite runs.
    stdout = re.sub(r"(?<= )(4[5-9]|5[0-9])m$", "45m", done.stdout, count=1, flags=re.M)
    assert (done.returncode, stdout, done.stderr) == (0, DEPLOYMENTS_TABLE, "")
    env = {k: v for k, v in os.environ.items() if k != ctl.SERVER_ENV}
    done = subprocess.run([sys.executable, "-m", "meshserve.scheduler.ctl", "--server", free_address, "get", "nodes"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 3 and done.stdout == ""
    assert done.stderr.startswith("error: cannot reach the scheduler at") and "Traceback" not in done.stderr


# ---------------------------------------------------------------- output cells


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (45, "45s"), (119, "119s"), (120, "2m"), (330, "5m30s"), (45 * 60, "45m"), (3 * 3600, "3h"),
    (3 * 3600 + 20 * 60, "3h20m"), (30 * 3600, "30h"), (3 * 86400 + 4 * 3600, "3d4h"), (12 * 86400, "12d"),
    (800 * 86400, "2y70d"),
])
def test_age(seconds, text):
    assert output.age(1_000_000, 1_000_000 + seconds * 1000) == text


def test_age_of_an_unknown_time_and_a_clock_behind():
    assert output.age(0, NOW_MS) == "-"
    assert output.age(NOW_MS + 5000, NOW_MS) == "0s"


@pytest.mark.parametrize("size, text", [(0, "0MiB"), (512 * 2**20, "512MiB"), (GIB, "1.0GiB"),
                                        (int(79.25 * GIB), "79.2GiB"), (80 * GIB, "80.0GiB")])
def test_human_size(size, text):
    assert output.human_size(size) == text


def test_table_aligns_folds_and_fills_cells():
    text = output.table(("A", "LONGER"), [("x", "multi\nline  value"), ("wider-cell", "")])
    assert text == "A            LONGER\nx            multi line value\nwider-cell   -\n"
