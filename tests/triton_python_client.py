"""Calls the Triton python models of ``triton_python_models.py`` with tritonclient; prints one JSON report.

Run as ``python triton_python_client.py ADDRESS PART...`` in its own process:
tritonclient registers Triton's own copy of the ``inference.*`` protos, which
would clash with meshserve's in the test process. Every call has a client
timeout; the report holds what came back, the test module asserts on it.
"""

from __future__ import annotations

import json
import sys
import threading

import numpy as np
import tritonclient.grpc as tc

TIMEOUT_S = 30


def _input(name: str, array: np.ndarray, datatype: str) -> tc.InferInput:
    tensor = tc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _error(err: tc.InferenceServerException) -> list[str]:
    return [str(err.status()), err.message()]


def add_sub(client) -> dict:
    a = np.array([1, 2, 3, 4], np.float32)
    b = np.array([0.5, 0.25, 2, 8], np.float32)
    result = client.infer("add_sub", [_input("INPUT0", a, "FP32"), _input("INPUT1", b, "FP32")],
                          request_id="as-1", client_timeout=TIMEOUT_S)
    config = client.get_model_config("add_sub", as_json=True)["config"]
    return {"sum": result.as_numpy("OUTPUT0").tolist(), "diff": result.as_numpy("OUTPUT1").tolist(),
            "dtype": str(result.as_numpy("OUTPUT0").dtype), "id": result.get_response().id,
            "backend": config["backend"]}


def _repeat_inputs(values, delays, wait):
    return [_input("IN", np.array(values, np.int32), "INT32"),
            _input("DELAY", np.array(delays, np.uint32), "UINT32"),
            _input("WAIT", np.array([wait], np.uint32), "UINT32")]


def _stream(client, requests: list[tuple[str, list, dict]]) -> list:
    """Send ``(model, inputs, options)`` on one stream; every response or error, in arrival order."""
    arrived: list = []
    lock = threading.Lock()

    def callback(result, error):
        with lock:
            if error is not None:
                arrived.append({"error": str(error)})
                return
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            outputs = {o.name: result.as_numpy(o.name).tolist() for o in response.outputs}
            arrived.append({"id": response.id, "final": final, **outputs})

    client.start_stream(callback=callback, stream_timeout=TIMEOUT_S)
    for model, inputs, options in requests:
        client.async_stream_infer(model, inputs, **options)
    client.stop_stream()  # half-closes and waits for every response
    return arrived


def repeat(client) -> dict:
    report = {"stream": _stream(client, [("repeat_int32", _repeat_inputs([4, 2, 0, 1], [1, 2, 3, 4], 5),
                                          {"request_id": "rep-1", "enable_empty_final_response": True})])}
    # One instance: the slow request's execute returns at once (WAIT 0), so the fast one runs while
    # the slow one's responses are still on their way, as in Triton.
    report["interleaved"] = _stream(client, [
        ("repeat_int32", _repeat_inputs([1, 2, 3], [300, 300, 300], 0), {"request_id": "slow"}),
        ("repeat_int32", _repeat_inputs([9], [0], 0), {"request_id": "fast"}),
    ])
    try:
        client.infer("repeat_int32", _repeat_inputs([1], [0], 0), client_timeout=TIMEOUT_S)
        report["unary"] = None
    except tc.InferenceServerException as err:
        report["unary"] = _error(err)
    return report


def string(client) -> dict:
    report = {"answers": []}
    for word in (b"hello", b"meshserve"):
        result = client.infer("string", [_input("INPUT0", np.array([word], dtype=np.object_), "BYTES")],
                              client_timeout=TIMEOUT_S)
        report["answers"].append([v.decode() for v in result.as_numpy("OUTPUT0").tolist()])
    return report


def string_third(client) -> dict:
    try:
        client.infer("string", [_input("INPUT0", np.array([b"third"], dtype=np.object_), "BYTES")],
                     client_timeout=TIMEOUT_S)
        return {"third": None}
    except tc.InferenceServerException as err:
        return {"third": _error(err)}


def probe(client) -> dict:
    results: dict = {}
    done = threading.Semaphore(0)

    def send(i: int) -> None:
        x = np.array([[i, i + 1]], np.int32)
        outputs = [tc.InferRequestedOutput("SEEN"), tc.InferRequestedOutput("Y")] if i else \
            [tc.InferRequestedOutput("SEEN")]

        def callback(result, error, i=i):
            results[i] = {"error": str(error)} if error else {
                "seen": json.loads(result.as_numpy("SEEN")[0][0]),
                "y": result.as_numpy("Y").tolist() if i else None}
            done.release()

        parameters = {"color": "red", "n": i, **({"fail": True} if i == 5 else {})}
        client.async_infer("probe", [_input("X", x, "INT32")], callback, outputs=outputs,
                           request_id=f"probe-{i}", parameters=parameters,
                           client_timeout=TIMEOUT_S)

    send(0)  # its execute runs a second; the next five queue meanwhile and form one batch
    for i in range(1, 6):
        send(i)
    for _ in range(6):
        done.acquire(timeout=2 * TIMEOUT_S)
    return {"results": {str(k): v for k, v in results.items()}}


def hostile(client) -> dict:
    report = {}
    for mode in range(1, 11):
        try:
            result = client.infer("hostile", [_input("MODE", np.array([mode], np.int32), "INT32")],
                                  client_timeout=TIMEOUT_S)
            report[str(mode)] = {"out": result.as_numpy("OUT").tolist()}
        except tc.InferenceServerException as err:
            report[str(mode)] = {"error": _error(err)}
    streamed = _stream(client, [("hostile_stream", [_input("MODE", np.array([mode], np.int32), "INT32")],
                                 {"request_id": f"mode-{mode}"}) for mode in (1, 2, 3, 4, 9)])
    return {"unary": report, "stream": streamed}


def auto(client) -> dict:
    result = client.infer("auto", [_input("A", np.array([1, 2, 3], np.float32), "FP32")],
                          client_timeout=TIMEOUT_S)
    inputs = client.get_model_metadata("auto", as_json=True)["inputs"]
    return {"b": result.as_numpy("B").tolist(), "inputs": [i["name"] for i in inputs]}


def index(client) -> dict:
    models = client.get_model_repository_index(as_json=True)["models"]
    return {m["name"]: [m.get("state", ""), m.get("reason", "")] for m in models}


PARTS = {f.__name__: f for f in (add_sub, repeat, string, string_third, probe, hostile, auto, index)}


def main() -> None:
    client = tc.InferenceServerClient(sys.argv[1])
    report = {part: PARTS[part](client) for part in sys.argv[2:]}
    client.close()
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
