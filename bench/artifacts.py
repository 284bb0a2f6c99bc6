"""Model delivery, measured: apply to first call for an uploaded model on 2 hosts; cache hit vs miss.

    .venv/bin/python -m bench.artifacts [--size 1GiB] [--quick]

One scheduler (its blob folder), two node agents and a proxy on loopback
(tests/mesh_harness.py), and ``scheduler ctl apply`` run as an operator
would, from a folder that only the ctl side has: a python model plus
``--size`` of random weights. Figures:

- ``upload_s``: the ctl apply call (digest, pack, upload once, apply);
- ``apply_to_first_call_s``: from starting ctl apply to the first successful
  call through the proxy;
- ``apply_to_both_ready_s``: until both replicas (one per host) are ready:
  each host fetched the bundle from the scheduler's store, never from the
  operator (the scheduler received one upload: ``uploads``);
- ``miss_start_s`` / ``hit_start_s``: from the scheduler placing the replicas
  to both ready, first with the agents' caches empty (fetch, verify, unpack),
  then after scaling to 0 and back to 2 with the model still cached;
  ``miss_over_hit`` is their ratio, side by side in one run.

Human lines first; the last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from mesh_harness import Admin, Mesh  # noqa: E402 - the tests' harness, found through the path above

from meshserve.clients import InferenceClient  # noqa: E402
from meshserve.common.sizes import parse_size  # noqa: E402
from meshserve.protos.mesh import control_pb2 as mesh  # noqa: E402

CONFIG = """name: "doubler"
backend: "python"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
MODEL_PY = """import numpy as np


class Predictor:
    def __init__(self, config):
        pass

    def predict(self, inputs):
        return {"Y": (inputs["X"] * 2).astype(np.float32)}
"""
SPEC = """kind: Deployment
name: big
model: {repository: ./models, name: doubler, source: upload}
replicas: 2
resources: {cpu: 100m}
"""
TIMEOUT_S = 900.0


def write_model(root: pathlib.Path, size: int) -> None:
    folder = root / "models" / "doubler"
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(CONFIG)
    (folder / "1" / "model.py").write_text(MODEL_PY)
    with open(folder / "1" / "weights.bin", "wb") as out:
        left = size
        while left:
            chunk = min(left, 64 << 20)
            out.write(os.urandom(chunk))
            left -= chunk
    (root / "big.yaml").write_text(SPEC)


def wait(predicate, what: str, timeout: float = TIMEOUT_S):
    print(f"waiting for {what}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = predicate()
        except Exception:  # noqa: BLE001 - not there yet (no route, a replica starting)
            result = None
        if result:
            return result
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def both_ready(admin: Admin) -> bool:
    replicas = admin.replicas("big")
    return len(replicas) == 2 and all(r.state == "ready" for r in replicas)


def all_placed(admin: Admin) -> bool:
    replicas = admin.replicas("big")
    return len(replicas) == 2 and all(r.node for r in replicas)


def call(address: str) -> bool:
    with InferenceClient(address, timeout=5) as client:
        y = client.infer("doubler", {"X": np.array([1.0, 2.0], dtype=np.float32)})["Y"]
    return list(y) == [2.0, 4.0]


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.artifacts")
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="weights size (default 1GiB)")
    parser.add_argument("--quick", action="store_true", help="16MiB of weights: a smoke run")
    args = parser.parse_args()
    size = parse_size("16MiB") if args.quick else args.size
    cluster = Mesh()
    figures: dict = {"benchmark": "artifacts", "weights_bytes": size}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-artifacts-") as scratch:
            operator = pathlib.Path(scratch)
            write_model(operator, size)
            scheduler = cluster.scheduler(f"sqlite:///{operator / 'state.db'}", "s1")
            for name in ("host-a", "host-b"):
                cluster.agent(name, scheduler.address)
            proxy = cluster.proxy(scheduler.address)
            admin = Admin(scheduler.address)
            wait(lambda: len(admin.nodes()) == 2, "2 nodes", 120)

            start = time.monotonic()
            subprocess.run([sys.executable, "-m", "meshserve.scheduler", "ctl", "--server", scheduler.address,
                            "--timeout", "60", "apply", "-f", str(operator / "big.yaml")], check=True,
                           cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
            uploaded = time.monotonic()
            wait(lambda: all_placed(admin), "placement")
            placed = time.monotonic()
            wait(lambda: call(proxy.address), "the first successful call")
            first_call = time.monotonic()
            wait(lambda: both_ready(admin), "both replicas ready")
            ready = time.monotonic()
            blobs = list((pathlib.Path(cluster._files.name) / "artifacts" / "sha256").iterdir())

            admin.stub.Scale(mesh.ScaleRequest(name="big", replicas=0), timeout=10)
            wait(lambda: not admin.replicas("big"), "scaled to 0")
            admin.stub.Scale(mesh.ScaleRequest(name="big", replicas=2), timeout=10)
            wait(lambda: all_placed(admin), "placement again")
            placed_again = time.monotonic()
            wait(lambda: both_ready(admin), "both ready from the cache")
            ready_again = time.monotonic()
            admin.close()
            figures.update({
                "upload_s": round(uploaded - start, 3),
                "apply_to_first_call_s": round(first_call - start, 3),
                "apply_to_both_ready_s": round(ready - start, 3),
                "uploads": len(blobs),
                "miss_start_s": round(ready - placed, 3),
                "hit_start_s": round(ready_again - placed_again, 3),
            })
            figures["miss_over_hit"] = round(figures["miss_start_s"] / max(figures["hit_start_s"], 1e-3), 2)
    finally:
        cluster.close()
    print(f"{size} bytes of weights: ctl apply (digest, pack, upload) {figures['upload_s']}s; first call "
          f"{figures['apply_to_first_call_s']}s after apply began; both hosts ready at {figures['apply_to_both_ready_s']}s")
    print(f"start with an empty cache {figures['miss_start_s']}s vs cached {figures['hit_start_s']}s "
          f"({figures['miss_over_hit']}x)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
