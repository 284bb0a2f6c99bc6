"""Build examples/models/mlp_onnx/1/model.onnx: a fixed, seeded 2-layer MLP.

    INPUT  FP32 [batch, 8]
      -> Gemm (W1 [8, 16], b1 [16]) -> Relu
      -> Gemm (W2 [16, 4], b2 [4])
    OUTPUT FP32 [batch, 4]

``batch`` is a symbolic (dynamic) dimension. The weights come from
``numpy.random.default_rng(SEED)``, so every run writes the same model.
``reference_forward`` is the same computation in numpy; tests compare it with
onnxruntime's output.

Rebuild (needs the ``onnx`` package):

    python examples/models/mlp_onnx/build.py            # writes 1/model.onnx
    python examples/models/mlp_onnx/build.py --check    # exit 1 if it differs
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

SEED = 20240917
IN_FEATURES, HIDDEN, OUT_FEATURES = 8, 16, 4
OPSET = 17  # supported by every onnxruntime >= 1.14
IR_VERSION = 8  # the IR version that goes with opset 17
OUTPUT_PATH = pathlib.Path(__file__).resolve().parent / "1" / "model.onnx"


def make_weights(seed: int = SEED) -> dict[str, np.ndarray]:
    """He-initialised weights and small biases, all float32, from ``seed``."""
    rng = np.random.default_rng(seed)

    def layer(fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
        w = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        b = rng.uniform(-0.1, 0.1, size=fan_out)
        return w.astype(np.float32), b.astype(np.float32)

    w1, b1 = layer(IN_FEATURES, HIDDEN)
    w2, b2 = layer(HIDDEN, OUT_FEATURES)
    return {"W1": w1, "b1": b1, "W2": w2, "b2": b2}


def reference_forward(x: np.ndarray, weights: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """OUTPUT = relu(x @ W1 + b1) @ W2 + b2, in float32, for x of shape [batch, 8]."""
    w = make_weights() if weights is None else weights
    x = np.asarray(x, dtype=np.float32)
    hidden = np.maximum(x @ w["W1"] + w["b1"], np.float32(0))
    return (hidden @ w["W2"] + w["b2"]).astype(np.float32)


def build_model(weights: dict[str, np.ndarray] | None = None):
    """The MLP as an ``onnx.ModelProto`` (checked with ``onnx.checker``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = make_weights() if weights is None else weights
    initializers = [numpy_helper.from_array(array, name=name) for name, array in w.items()]
    nodes = [
        helper.make_node("Gemm", ["INPUT", "W1", "b1"], ["hidden_pre"], name="fc1"),
        helper.make_node("Relu", ["hidden_pre"], ["hidden"], name="relu"),
        helper.make_node("Gemm", ["hidden", "W2", "b2"], ["OUTPUT"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        inputs=[helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["batch", IN_FEATURES])],
        outputs=[helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["batch", OUT_FEATURES])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        producer_name="meshserve-examples",
        producer_version="1",
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
    )
    model.doc_string = "2-layer MLP 8 -> 16 -> 4 with seeded weights (examples/models/mlp_onnx/build.py)"
    onnx.checker.check_model(model)
    return model


def serialized() -> bytes:
    return build_model().SerializeToString(deterministic=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=pathlib.Path, default=OUTPUT_PATH)
    parser.add_argument("--check", action="store_true", help="compare with --output, write nothing")
    args = parser.parse_args(argv)
    data = serialized()
    if args.check:
        same = args.output.is_file() and args.output.read_bytes() == data
        print(f"{args.output}: {'up to date' if same else 'DIFFERS from a fresh build'}")
        return 0 if same else 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(data)
    print(f"wrote {args.output} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
