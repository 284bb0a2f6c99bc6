"""The main job: a runtime replica serving examples/models, shown working, then kept serving.

    .venv/bin/python examples/demo.py [--listen 127.0.0.1:8001] [--once]

Starts ``python -m meshserve.runtime`` on the example repository, waits until it is
ready, makes one call to each example model through the client library
(unary, BYTES, streaming, ONNX), prints what came back, and keeps serving
until Ctrl-C (``--once``: stop after the calls). SIGTERM or Ctrl-C drains
the replica before it exits.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

import numpy as np

from meshserve.clients import InferenceClient
from meshserve.common.errors import MeshError
from meshserve.common.ready_line import parse_ready_line

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def start_runtime(listen: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "meshserve.runtime", "--model-repository", str(REPO_ROOT / "examples" / "models"),
         "--listen", listen],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )
    for line in process.stdout:
        print(f"  runtime | {line.rstrip()}")
        address = parse_ready_line(line, "runtime")
        if address is not None:
            return process, address
    raise SystemExit(f"the runtime exited with code {process.wait()} before it was ready")


def show_calls(address: str) -> None:
    with InferenceClient(address, timeout=30) as client:
        print(f"\nserver ready: {client.is_server_ready()}; models:")
        for model in client.repository_index().models:
            reason = f"  ({model.reason})" if model.reason else ""
            print(f"  {model.name:<16} {model.state:<12}{reason}")

        a = np.arange(16, dtype=np.float32)[None, :]
        b = np.full((1, 16), 2.0, dtype=np.float32)
        out = client.infer("add_sub", {"INPUT0": a, "INPUT1": b})
        print(f"\nadd_sub:    INPUT0+INPUT1 = {out['OUTPUT0'][0, :6]}...  INPUT0-INPUT1 = {out['OUTPUT1'][0, :6]}...")

        out = client.infer("echo_bytes", {"INPUT0": np.array([b"hello", b"mesh"], dtype=object)})
        print(f"echo_bytes: {list(out['OUTPUT0'])}")

        x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
        out = client.infer("mlp_onnx", {"INPUT": x})
        print(f"mlp_onnx:   OUTPUT shape {out['OUTPUT'].shape}, first row {np.round(out['OUTPUT'][0], 4)}")

        prompt = "A replica on a GPU host"
        print(f"textgen:    {prompt}", end="", flush=True)
        for response in client.stream("textgen", {"PROMPT": np.array([prompt.encode()], dtype=object),
                                                  "MAX_TOKENS": np.array([24], dtype=np.int32)}):
            print(response["TOKEN"][0].decode(), end="", flush=True)
        print()

        try:
            client.infer("add_sub", {"INPUT0": a[:, :8], "INPUT1": b})
        except MeshError as err:
            print(f"bad input:  {type(err).__name__}: {err}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8001")
    parser.add_argument("--once", action="store_true", help="stop after the demo calls")
    args = parser.parse_args()
    process, address = start_runtime(args.listen)
    try:
        show_calls(address)
        if not args.once:
            print(f"\nserving examples/models on {address} (KServe v2 gRPC); Ctrl-C to stop")
            process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
