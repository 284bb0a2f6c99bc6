"""Build examples/pipelines/image/classifier/1/model.onnx: a tiny colour-and-texture CNN.

    INPUT  FP32 [batch, 3, 64, 64]   normalised pixels from ``preprocess``
      colour:  GlobalAveragePool -> Flatten                              [batch, 3]
      texture: Conv 3x3/2 (3 -> 8) -> Relu -> GlobalAveragePool -> Flatten [batch, 8]
      Concat(colour, texture) -> Gemm (W [11, 10], b [10])
    LOGITS FP32 [batch, 10]

The ten classes are made-up colour names (``PALETTE``). The colour rows of
the head score each class by its squared distance to the class's prototype
colour, ``-(|m - p|^2 - |m|^2) / TEMPERATURE = (2 m.p - |p|^2) / TEMPERATURE``
(the ``|m|^2`` term is the same for every class, so softmax ignores it): the
model names an image's average colour. The convolution and the texture rows
come from ``numpy.random.default_rng(SEED)`` and only nudge the scores. Every
run writes the same model; ``reference_forward`` is the same computation in
numpy. The class names also go to ``postprocess/1/labels.txt``, one a line,
so the labels always match the model.

Rebuild (needs the ``onnx`` package):

    python examples/pipelines/image/classifier/build.py          # writes model.onnx and labels.txt
    python examples/pipelines/image/classifier/build.py --check  # exit 1 if either differs
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

SEED = 20250101
SIZE = 64  # the side of the square image preprocess produces
CONV_CHANNELS = 8
TEMPERATURE = 2.0
TEXTURE_SCALE = 0.05  # the texture rows of the head: small next to the colour rows
# The per-channel normalisation preprocess applies (ImageNet's mean and std).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PALETTE = [  # made-up class names and their prototype RGB colours
    ("ember", (220, 60, 40)),
    ("saffron", (245, 190, 30)),
    ("moss", (90, 140, 50)),
    ("lagoon", (30, 150, 160)),
    ("cobalt", (30, 60, 190)),
    ("heather", (150, 100, 180)),
    ("blush", (240, 160, 170)),
    ("umber", (110, 70, 40)),
    ("chalk", (235, 235, 225)),
    ("slate", (60, 65, 75)),
]
LABELS = [name for name, _ in PALETTE]
OPSET = 17  # supported by every onnxruntime >= 1.14
IR_VERSION = 8  # the IR version that goes with opset 17
HERE = pathlib.Path(__file__).resolve().parent
OUTPUT_PATH = HERE / "1" / "model.onnx"
LABELS_PATH = HERE.parent / "postprocess" / "1" / "labels.txt"


def normalise_rgb(rgb) -> np.ndarray:
    """RGB in 0..255 (shape [..., 3]) -> the normalised values preprocess produces."""
    rgb = np.asarray(rgb, dtype=np.float32) / np.float32(255)
    return ((rgb - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)).astype(np.float32)


def make_weights(seed: int = SEED) -> dict[str, np.ndarray]:
    """Conv weights (He, seeded), and the head: colour rows from PALETTE, texture rows seeded."""
    rng = np.random.default_rng(seed)
    fan_in = 3 * 3 * 3
    conv_w = rng.standard_normal((CONV_CHANNELS, 3, 3, 3)) * np.sqrt(2.0 / fan_in)
    conv_b = rng.uniform(-0.1, 0.1, size=CONV_CHANNELS)
    texture = rng.standard_normal((CONV_CHANNELS, len(PALETTE))) * TEXTURE_SCALE
    prototypes = normalise_rgb([rgb for _, rgb in PALETTE]).astype(np.float64)  # [10, 3]
    colour = 2.0 * prototypes.T / TEMPERATURE  # [3, 10]
    head_b = -(prototypes**2).sum(axis=1) / TEMPERATURE
    return {
        "conv_w": conv_w.astype(np.float32),
        "conv_b": conv_b.astype(np.float32),
        "head_w": np.concatenate([colour, texture]).astype(np.float32),  # [11, 10]
        "head_b": head_b.astype(np.float32),
    }


def reference_forward(x: np.ndarray, weights: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """LOGITS for x of shape [batch, 3, H, W], in numpy (float32 inputs, float64 sums)."""
    w = make_weights() if weights is None else weights
    x = np.asarray(x, dtype=np.float64)
    batch, _, height, width = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out_h, out_w = (height - 1) // 2 + 1, (width - 1) // 2 + 1
    conv = np.zeros((batch, CONV_CHANNELS, out_h, out_w))
    kernel = w["conv_w"].astype(np.float64)
    for dy in range(3):
        for dx in range(3):
            patch = padded[:, :, dy : dy + 2 * out_h - 1 : 2, dx : dx + 2 * out_w - 1 : 2]
            conv += np.einsum("bchw,oc->bohw", patch, kernel[:, :, dy, dx])
    conv += w["conv_b"].astype(np.float64)[None, :, None, None]
    texture = np.maximum(conv, 0.0).mean(axis=(2, 3))
    colour = x.mean(axis=(2, 3))
    features = np.concatenate([colour, texture], axis=1)
    return (features @ w["head_w"].astype(np.float64) + w["head_b"]).astype(np.float32)


def build_model(weights: dict[str, np.ndarray] | None = None):
    """The classifier as an ``onnx.ModelProto`` (checked with ``onnx.checker``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = make_weights() if weights is None else weights
    initializers = [numpy_helper.from_array(array, name=name) for name, array in w.items()]
    nodes = [
        helper.make_node("GlobalAveragePool", ["INPUT"], ["colour_pool"], name="colour_pool"),
        helper.make_node("Flatten", ["colour_pool"], ["colour"], name="colour_flat", axis=1),
        helper.make_node(
            "Conv", ["INPUT", "conv_w", "conv_b"], ["conv"], name="conv",
            kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["conv"], ["conv_relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["conv_relu"], ["texture_pool"], name="texture_pool"),
        helper.make_node("Flatten", ["texture_pool"], ["texture"], name="texture_flat", axis=1),
        helper.make_node("Concat", ["colour", "texture"], ["features"], name="concat", axis=1),
        helper.make_node("Gemm", ["features", "head_w", "head_b"], ["LOGITS"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "colour_classifier",
        inputs=[helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        outputs=[helper.make_tensor_value_info("LOGITS", TensorProto.FLOAT, ["batch", len(PALETTE)])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        producer_name="meshserve-examples",
        producer_version="1",
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
    )
    model.doc_string = (
        "colour-and-texture CNN, 3x64x64 -> 10 logits, seeded weights "
        "(examples/pipelines/image/classifier/build.py)"
    )
    onnx.checker.check_model(model)
    return model


def serialized() -> bytes:
    return build_model().SerializeToString(deterministic=True)


def labels_text() -> str:
    return "".join(f"{label}\n" for label in LABELS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=pathlib.Path, default=OUTPUT_PATH)
    parser.add_argument("--labels", type=pathlib.Path, default=LABELS_PATH)
    parser.add_argument("--check", action="store_true", help="compare with --output and --labels, write nothing")
    args = parser.parse_args(argv)
    files = [(args.output, serialized()), (args.labels, labels_text().encode())]
    if args.check:
        status = 0
        for path, data in files:
            same = path.is_file() and path.read_bytes() == data
            print(f"{path}: {'up to date' if same else 'DIFFERS from a fresh build'}")
            status |= 0 if same else 1
        return status
    for path, data in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"wrote {path} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
