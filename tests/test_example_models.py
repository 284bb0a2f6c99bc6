"""Unit tests for the example models in examples/models (no server started).

Each python model's ``model.py`` is imported straight from its version folder
and its ``Predictor`` is built with the config dict the runtime would pass,
derived here from the model's own config.pbtxt.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import numpy as np
import pytest
from google.protobuf import text_format
from test_runtime_helpers import load_module  # noqa: E402

from meshserve.protos.inference import model_config_pb2

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples" / "models"
MODELS = ["add_sub", "echo_bytes", "textgen", "mlp_onnx", "resnet50_torch"]


def _model_config(model: str) -> model_config_pb2.ModelConfig:
    text = (EXAMPLES / model / "config.pbtxt").read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _datatype(data_type: int) -> str:
    name = model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def _predictor(model: str, version: str = "1", device: str = "cpu"):
    cfg = _model_config(model)

    def tensors(items):
        return [
            {
                "name": t.name,
                "datatype": _datatype(t.data_type),
                "shape": ([-1] if cfg.max_batch_size > 0 else []) + list(t.dims),
            }
            for t in items
        ]

    config = {
        "name": cfg.name or model,
        "version": version,
        "model_dir": str(EXAMPLES / model / version),
        "max_batch_size": cfg.max_batch_size,
        "parameters": {k: v.string_value for k, v in cfg.parameters.items()},
        "inputs": tensors(cfg.input),
        "outputs": tensors(cfg.output),
        "instance_index": 0,
        "device": device,
    }
    module = load_module(EXAMPLES / model / version / "model.py", f"example_{model}")
    return module.Predictor(config)


# -- configs -----------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_config_parses_and_has_version_1(model):
    cfg = _model_config(model)
    assert cfg.name in ("", model)
    assert (EXAMPLES / model / "1").is_dir()
    if cfg.backend == "python":
        assert (EXAMPLES / model / "1" / "model.py").is_file()
    else:
        assert cfg.platform == "onnxruntime_onnx"


def test_config_details():
    add_sub = _model_config("add_sub")
    assert add_sub.max_batch_size == 64
    assert add_sub.dynamic_batching.preferred_batch_size
    assert 0 < add_sub.dynamic_batching.max_queue_delay_microseconds <= 1000
    assert add_sub.dynamic_batching.default_queue_policy.max_queue_size > 0
    assert [(g.count, g.kind) for g in add_sub.instance_group] == [
        (1, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    ]

    textgen = _model_config("textgen")
    assert textgen.model_transaction_policy.decoupled
    assert textgen.max_batch_size == 0
    assert {i.name: i.optional for i in textgen.input} == {"PROMPT": False, "MAX_TOKENS": True}

    mlp = _model_config("mlp_onnx")
    assert mlp.platform == "onnxruntime_onnx" and mlp.max_batch_size == 32
    assert mlp.HasField("dynamic_batching")
    assert not mlp.input and not mlp.output  # read from the graph by the runtime

    resnet = _model_config("resnet50_torch")
    assert resnet.max_batch_size == 128
    assert list(resnet.dynamic_batching.preferred_batch_size) == [32, 64, 128]
    assert resnet.dynamic_batching.max_queue_delay_microseconds == 2000
    assert resnet.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


# -- add_sub -----------------------------------------------------------------


def test_add_sub_batch_of_three():
    predictor = _predictor("add_sub")
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3, 16)).astype(np.float32)
    b = rng.standard_normal((3, 16)).astype(np.float32)
    out = predictor.predict({"INPUT0": a, "INPUT1": b})
    assert set(out) == {"OUTPUT0", "OUTPUT1"}
    for name, expected in (("OUTPUT0", a + b), ("OUTPUT1", a - b)):
        assert out[name].dtype == np.float32 and out[name].shape == (3, 16)
        np.testing.assert_array_equal(out[name], expected)


def test_add_sub_rejects_mismatched_shapes():
    predictor = _predictor("add_sub")
    with pytest.raises(ValueError, match="INPUT0"):
        predictor.predict({"INPUT0": np.zeros((2, 16), np.float32), "INPUT1": np.zeros((3, 16), np.float32)})


# -- echo_bytes --------------------------------------------------------------


def test_echo_bytes_returns_the_same_elements():
    predictor = _predictor("echo_bytes")
    data = np.array([b"hello", b"", b"\x00\xff binary", "héllo".encode()], dtype=object)
    out = predictor.predict({"INPUT0": data})["OUTPUT0"]
    assert out.dtype == object and out.shape == data.shape
    assert list(out) == list(data)
    assert all(isinstance(item, bytes) for item in out)
    assert out is not data


# -- textgen -----------------------------------------------------------------

_CORPUS_TOKEN = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[.,;:!?]")


@pytest.fixture(scope="module")
def textgen():
    return _predictor("textgen")


def _generate(predictor, prompt: str, max_tokens: int | None = None) -> list[str]:
    inputs = {"PROMPT": np.array([prompt.encode()], dtype=object)}
    if max_tokens is not None:
        inputs["MAX_TOKENS"] = np.array([max_tokens], dtype=np.int32)
    pieces = []
    for response in predictor.predict(inputs):
        assert set(response) == {"TOKEN"}
        token = response["TOKEN"]
        assert token.dtype == object and token.shape == (1,) and isinstance(token[0], bytes)
        pieces.append(token[0].decode("utf-8"))
    return pieces


def test_textgen_streams_max_tokens_responses(textgen):
    assert len(_generate(textgen, "The server", 5)) == 5
    assert len(_generate(textgen, "The server", 0)) == 0
    assert len(_generate(textgen, "The server")) == 32  # default when MAX_TOKENS is omitted


def test_textgen_is_deterministic_and_prefix_stable(textgen):
    first = _generate(textgen, "A GPU is", 24)
    assert first == _generate(textgen, "A GPU is", 24)
    assert _generate(textgen, "A GPU is", 10) == first[:10]
    fresh = _predictor("textgen")  # a second instance agrees too
    assert _generate(fresh, "A GPU is", 24) == first


def test_textgen_continues_with_corpus_vocabulary(textgen):
    corpus = (EXAMPLES / "textgen" / "1" / "corpus.txt").read_text().lower()
    vocabulary = set(_CORPUS_TOKEN.findall(corpus))
    for prompt in ("The server", "", "Completely unseen zebra words"):
        pieces = _generate(textgen, prompt, 40)
        for piece in pieces:
            assert piece.strip().lower() in vocabulary, piece
        text = prompt + "".join(pieces)
        assert "  " not in text
        # Every generated word is preceded by a space unless it starts the text.
        assert all(p[0] == " " or p in ".,;:!?" or (i == 0 and not prompt) for i, p in enumerate(pieces))


def test_textgen_follows_the_corpus_for_a_seen_context(textgen):
    # "dynamic" is followed only by "batching" in the corpus: the order-4
    # context must pick it whatever the random draw.
    assert _generate(textgen, "This is called dynamic", 1) == [" batching"]


def test_textgen_rejects_bad_max_tokens(textgen):
    with pytest.raises(ValueError, match="MAX_TOKENS"):
        _generate(textgen, "The server", -1)
    with pytest.raises(ValueError, match="MAX_TOKENS"):
        _generate(textgen, "The server", 10_000)


# -- mlp_onnx ----------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_build():
    pytest.importorskip("onnx")
    return load_module(EXAMPLES / "mlp_onnx" / "build.py", "example_mlp_onnx_build")


def test_mlp_onnx_committed_file_matches_a_fresh_build(mlp_build):
    import onnx
    from onnx import numpy_helper

    committed = onnx.load(str(EXAMPLES / "mlp_onnx" / "1" / "model.onnx"))
    fresh = mlp_build.build_model()
    weights = mlp_build.make_weights()
    assert {i.name for i in committed.graph.initializer} == set(weights)
    for init in committed.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(init), weights[init.name])
    assert [n.op_type for n in committed.graph.node] == [n.op_type for n in fresh.graph.node]
    assert committed.opset_import[0].version == mlp_build.OPSET
    # Rebuilding is deterministic.
    np.testing.assert_array_equal(mlp_build.make_weights()["W2"], weights["W2"])
    assert mlp_build.serialized() == mlp_build.serialized()


def test_mlp_onnx_runtime_matches_numpy_reference(mlp_build):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(
        str(EXAMPLES / "mlp_onnx" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape, inp.type) == ("INPUT", ["batch", 8], "tensor(float)")
    assert (out.name, out.shape, out.type) == ("OUTPUT", ["batch", 4], "tensor(float)")
    rng = np.random.default_rng(3)
    for batch in (1, 5, 32):
        x = rng.standard_normal((batch, 8)).astype(np.float32)
        (y,) = session.run(None, {"INPUT": x})
        assert y.shape == (batch, 4)
        np.testing.assert_allclose(y, mlp_build.reference_forward(x), rtol=1e-5, atol=1e-6)
    # The fresh in-memory build gives the same answers as the committed file.
    fresh = ort.InferenceSession(mlp_build.serialized(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(fresh.run(None, {"INPUT": x})[0], session.run(None, {"INPUT": x})[0])


# -- resnet50_torch ----------------------------------------------------------


def test_resnet50_torch_without_torch_fails_naming_torch():
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed")
    with pytest.raises(ImportError, match="torch"):
        load_module(EXAMPLES / "resnet50_torch" / "1" / "model.py", "example_resnet50_torch")


def test_resnet50_torch_forward():
    torch = pytest.importorskip("torch")
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    predictor = _predictor("resnet50_torch", device=device)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    out = predictor.predict({"INPUT": x})["OUTPUT"]
    assert out.dtype == np.float32 and out.shape == (2, 1000)
    assert np.isfinite(out).all()
    # Seeded weights: a second instance computes the same logits.
    again = _predictor("resnet50_torch", device=device).predict({"INPUT": x})["OUTPUT"]
    np.testing.assert_allclose(out, again, rtol=1e-2, atol=1e-2)
