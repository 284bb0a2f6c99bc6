"""BYTES tensors, measured: time and peak memory of the codec and of a runtime serving echo_bytes.

    .venv/bin/python -m bench.bytes_codec [--codec PATH] [--elements N] [--encode-elements N] [--server]

Each case runs in a fresh child process, which reports its wall and CPU time,
its peak RSS above the RSS it had before the case (``VmHWM``, reset with
``/proc/self/clear_refs``) and the RSS still held after the case's objects
are dropped and collected:

- ``decode``: ``decode_bytes`` of N empty elements (4 N bytes, the issue's
  65 M-element, 260 MB message by default);
- ``round_trip``: decode, then ``encode_bytes`` of the decoded array (what the
  runtime does for echo_bytes, without gRPC and the model);
- ``encode``: ``encode_bytes`` of an array of M empty elements (8 M: a 32 MB
  output) and of M/8 28-byte elements (also 32 MB).

``--codec`` loads ``protos/tensors.py`` from another file (e.g. the old one,
``git show main:protos/tensors.py > /tmp/old_tensors.py``) to compare.
``--server`` also starts a runtime serving ``examples/models/echo_bytes`` and
sends it one request of N empty elements and two of ``MAX_BYTES_ELEMENTS``
empty elements, reporting the answer, its time and the server's peak and
final RSS (``VmHWM``/``VmRSS`` of the runtime process). The last line is one
JSON object with every figure.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_ELEMENTS = 65_000_000  # the echo_bytes message: 65 M empty elements, 260 MB
DEFAULT_ENCODE_ELEMENTS = 8 << 20  # 8 Mi empty elements: a 32 MiB encoded output


def _status_kib(field: str, pid: str = "self") -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _load_codec(path: str | None):
    if path is None:
        from meshserve.common import tensors
        return tensors
    spec = importlib.util.spec_from_file_location("codec_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _case(name: str, codec_path: str | None, elements: int) -> dict:
    """Run one case in this process (the child) and return its figures."""
    import numpy as np

    codec = _load_codec(codec_path)
    if name == "decode" or name == "round_trip":
        prepared = bytes(4 * elements)
    elif name == "encode_empty":
        prepared = np.full(elements, b"", dtype=object)
    elif name == "encode_28_bytes":
        prepared = np.full(elements // 8, b"x" * 28, dtype=object)
    else:
        raise ValueError(name)
    gc.collect()
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    if name == "decode":
        result = codec.decode_bytes(prepared, [elements])
    elif name == "round_trip":
        result = codec.encode_bytes(codec.decode_bytes(prepared, [elements]))
    else:
        result = codec.encode_bytes(prepared)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _status_kib("VmHWM")
    size = len(result)
    del result
    gc.collect()
    kept = _status_kib("VmRSS") - before
    message = len(prepared) if isinstance(prepared, bytes) else None
    return {"case": name, "elements": elements if name != "encode_28_bytes" else elements // 8,
            "input_bytes": message, "result_len": size, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "peak_above_start_mb": round((peak - before) / 1024), "kept_mb": round(kept / 1024)}


def _in_child(name: str, codec_path: str | None, elements: int) -> dict:
    command = [sys.executable, "-m", "bench.bytes_codec", "--child", name, "--elements", str(elements)]
    if codec_path:
        command += ["--codec", codec_path]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _server_cases(elements: int) -> list[dict]:
    import grpc
    import numpy as np

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from conftest import EXAMPLES, RuntimeProcess

    from meshserve.common import tensors
    from meshserve.protos.inference import grpc_service_pb2 as pb
    from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc

    process = RuntimeProcess(["--listen", "127.0.0.1:0", "--model-repository", str(EXAMPLES),
                              "--model", "echo_bytes", "--max-message-bytes", str(300 << 20)])
    pid = str(process.proc.pid)
    figures = []
    try:
        channel = grpc.insecure_channel(process.address, options=[
            ("grpc.max_send_message_length", 300 << 20), ("grpc.max_receive_message_length", 300 << 20)])
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=60)
        largest_allowed = getattr(tensors, "MAX_BYTES_ELEMENTS", 1 << 22)
        for count in (elements, largest_allowed, largest_allowed):  # twice: does RSS settle?
            request = pb.ModelInferRequest(model_name="echo_bytes")
            request.inputs.add(name="INPUT0", datatype="BYTES", shape=[count])
            request.raw_input_contents.append(bytes(4 * count))
            baseline = _status_kib("VmRSS", pid)
            pathlib.Path(f"/proc/{pid}/clear_refs").write_text("5")
            started = time.perf_counter()
            try:
                response = stub.ModelInfer(request, timeout=600)
                answer = f"OK, {len(response.raw_output_contents[0])} bytes back"
            except grpc.RpcError as err:
                answer = f"{err.code().name}: {err.details()}"
            took = time.perf_counter() - started
            del request
            figures.append({"case": "server_echo_bytes", "elements": count, "message_mb": round(4 * count / 2**20),
                            "answer": answer[:160], "wall_s": round(took, 2),
                            "server_rss_before_mb": round(baseline / 1024),
                            "server_peak_mb": round(_status_kib("VmHWM", pid) / 1024),
                            "server_rss_after_mb": round(_status_kib("VmRSS", pid) / 1024)})
        channel.close()
    finally:
        process.stop()
    del np
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codec", help="path of a protos/tensors.py to measure instead of this one")
    parser.add_argument("--elements", type=int, default=DEFAULT_ELEMENTS)
    parser.add_argument("--encode-elements", type=int, default=DEFAULT_ENCODE_ELEMENTS)
    parser.add_argument("--cases", default="decode,round_trip,encode_empty,encode_28_bytes")
    parser.add_argument("--server", action="store_true", help="also measure a runtime serving echo_bytes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_case(args.child, args.codec, args.elements)))
        return
    figures = []
    for name in filter(None, args.cases.split(",")):
        count = args.encode_elements if name.startswith("encode") else args.elements
        figure = _in_child(name, args.codec, count)
        print("  ".join(f"{key}={value}" for key, value in figure.items()), flush=True)
        figures.append(figure)
    if args.server:
        for figure in _server_cases(args.elements):
            print("  ".join(f"{key}={value}" for key, value in figure.items()), flush=True)
            figures.append(figure)
    print(json.dumps({"codec": args.codec or "protos/tensors.py", "figures": figures}))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
