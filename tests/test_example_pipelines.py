"""Unit tests for the example pipelines in examples/pipelines (no server started).

Each python step's ``model.py`` is imported straight from its version folder
and its ``Predictor`` built with the config dict the runtime would pass,
derived from the step's own config.pbtxt; the ONNX classifier runs in
onnxruntime. The steps are chained by hand the way the ensembles' configs
chain them, and the ensemble configs are checked against the step configs
(every mapped tensor declared, data types and shapes agreeing). One test
serves the image repository with a real runtime and classifies through the
ensemble.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from google.protobuf import text_format
from test_runtime_helpers import load_module  # noqa: E402

from meshserve.protos.inference import model_config_pb2

PIPELINES = pathlib.Path(__file__).resolve().parent.parent / "examples" / "pipelines"
IMAGE = PIPELINES / "image"
LARGE = PIPELINES / "large_tensor"
SAMPLES = PIPELINES / "image_samples"
REPOSITORIES = {
    "image": (IMAGE, ["preprocess", "classifier", "postprocess", "image_pipeline"]),
    "large_tensor": (LARGE, ["expand", "reduce", "large_pipeline"]),
}
ENSEMBLES = [(IMAGE, "image_pipeline"), (LARGE, "large_pipeline")]
SAMPLE_FILES = ["ember.png", "lagoon.jpg", "chalk.png"]


def _config(repository: pathlib.Path, model: str) -> model_config_pb2.ModelConfig:
    text = (repository / model / "config.pbtxt").read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _datatype(data_type: int) -> str:
    name = model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def _predictor(repository: pathlib.Path, model: str):
    """The step's Predictor, built with the config dict runtime/backends/python_predictor.py passes."""
    cfg = _config(repository, model)

    def tensors(items):  # as the runtime describes them: dims without the batch axis
        return [{"name": t.name, "datatype": _datatype(t.data_type), "shape": list(t.dims)} for t in items]

    config = {
        "name": cfg.name,
        "version": "1",
        "model_dir": str(repository / model / "1"),
        "max_batch_size": cfg.max_batch_size,
        "parameters": {k: v.string_value for k, v in cfg.parameters.items()},
        "inputs": tensors(cfg.input),
        "outputs": tensors(cfg.output),
        "instance_index": 0,
        "device": "cpu",
    }
    module = load_module(repository / model / "1" / "model.py", f"example_pipeline_{model}")
    return module.Predictor(config)


def _images(names=SAMPLE_FILES) -> np.ndarray:
    """The sample files as an IMAGE batch: object array [batch, 1] of bytes."""
    return np.array([[(SAMPLES / name).read_bytes()] for name in names], dtype=object)


@pytest.fixture(scope="module")
def build():
    pytest.importorskip("onnx")
    return load_module(IMAGE / "classifier" / "build.py", "example_pipeline_classifier_build")


@pytest.fixture(scope="module")
def classifier():
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(IMAGE / "classifier" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return lambda pixels: session.run(None, {"INPUT": pixels})[0]


@pytest.fixture(scope="module")
def preprocess():
    pytest.importorskip("PIL")
    return _predictor(IMAGE, "preprocess")


@pytest.fixture(scope="module")
def postprocess():
    return _predictor(IMAGE, "postprocess")


# -- configs -----------------------------------------------------------------


@pytest.mark.parametrize(
    "repository,model", [(repo, model) for repo, models in REPOSITORIES.values() for model in models]
)
def test_config_parses_with_its_folder_name_and_version_1(repository, model):
    cfg = _config(repository, model)
    assert cfg.name == model
    assert (repository / model / "1").is_dir()
    if cfg.platform == "ensemble":
        assert cfg.ensemble_scheduling.step and not cfg.HasField("dynamic_batching")
    elif cfg.platform == "onnxruntime_onnx":
        assert (repository / model / "1" / "model.onnx").is_file()
    else:
        assert cfg.backend == "python" and (repository / model / "1" / "model.py").is_file()


def test_repositories_hold_only_their_models():
    """Every folder of a repository is a model (for Triton and for our runtime alike)."""
    for repository, models in REPOSITORIES.values():
        folders = sorted(p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))
        assert folders == sorted(models)


@pytest.mark.parametrize("repository,ensemble", ENSEMBLES)
def test_ensemble_maps_refer_to_declared_tensors(repository, ensemble):
    cfg = _config(repository, ensemble)
    # tensor name -> (datatype, dims) for the ensemble's inputs, then whatever the steps produce
    available = {t.name: (t.data_type, list(t.dims)) for t in cfg.input}
    produced = set()
    for step in cfg.ensemble_scheduling.step:
        assert step.model_version == -1
        step_cfg = _config(repository, step.model_name)
        # The same batching everywhere, so dims compare as they are (Triton needs <=).
        assert step_cfg.max_batch_size == cfg.max_batch_size, step.model_name
        inputs = {t.name: (t.data_type, list(t.dims)) for t in step_cfg.input}
        outputs = {t.name: (t.data_type, list(t.dims)) for t in step_cfg.output}
        required = {t.name for t in step_cfg.input if not t.optional}
        assert required <= set(step.input_map), f"{step.model_name}: inputs {sorted(required)} not all mapped"
        for key, tensor in step.input_map.items():
            assert key in inputs, f"{step.model_name} declares no input {key}"
            assert tensor in available, f"{ensemble}: {tensor} is neither an ensemble input nor an earlier output"
            assert available[tensor] == inputs[key], f"{step.model_name}.{key} vs {tensor}"
        for key, tensor in step.output_map.items():
            assert key in outputs, f"{step.model_name} declares no output {key}"
            assert tensor not in available, f"{ensemble}: {tensor} produced twice"
            available[tensor] = outputs[key]
            produced.add(tensor)
    for output in cfg.output:
        assert output.name in produced, f"{ensemble}: no step produces {output.name}"
        assert available[output.name] == (output.data_type, list(output.dims))


def test_image_pipeline_tensors():
    cfg = _config(IMAGE, "image_pipeline")
    assert [(t.name, _datatype(t.data_type), list(t.dims)) for t in cfg.input] == [("IMAGE", "BYTES", [1])]
    assert [(t.name, _datatype(t.data_type), list(t.dims)) for t in cfg.output] == [("LABELS", "BYTES", [5])]
    assert [s.model_name for s in cfg.ensemble_scheduling.step] == ["preprocess", "classifier", "postprocess"]
    large = _config(LARGE, "large_pipeline")
    assert [s.model_name for s in large.ensemble_scheduling.step] == ["expand", "reduce"]
    assert list(_config(LARGE, "expand").output[0].dims) == [1_000_000]


# -- the classifier model ----------------------------------------------------


def test_classifier_committed_model_matches_a_fresh_build(build, classifier):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    committed = onnx.load(str(IMAGE / "classifier" / "1" / "model.onnx"))
    fresh = build.build_model()
    weights = build.make_weights()
    assert {i.name: numpy_helper.to_array(i).shape for i in committed.graph.initializer} == {
        name: array.shape for name, array in weights.items()
    }
    for init in committed.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(init), weights[init.name])
    assert [n.op_type for n in committed.graph.node] == [n.op_type for n in fresh.graph.node]
    assert build.serialized() == build.serialized()  # deterministic
    # The same outputs as a fresh in-memory build and as the numpy reference.
    x = np.random.default_rng(5).standard_normal((4, 3, 64, 64)).astype(np.float32)
    session = ort.InferenceSession(build.serialized(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"INPUT": x})[0], classifier(x))
    np.testing.assert_allclose(classifier(x), build.reference_forward(x), rtol=1e-4, atol=1e-3)


def test_classifier_graph_matches_its_config(classifier):
    import onnxruntime as ort

    session = ort.InferenceSession(str(IMAGE / "classifier" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    cfg = _config(IMAGE, "classifier")
    assert (inp.name, inp.shape[1:], inp.type) == (cfg.input[0].name, list(cfg.input[0].dims), "tensor(float)")
    assert (out.name, out.shape[1:], out.type) == (cfg.output[0].name, list(cfg.output[0].dims), "tensor(float)")
    assert classifier(np.zeros((1, 3, 64, 64), np.float32)).shape == (1, 10)


def test_labels_file_matches_the_build(build):
    assert (IMAGE / "postprocess" / "1" / "labels.txt").read_text() == build.labels_text()
    assert len(build.LABELS) == len(set(build.LABELS)) == 10


# -- preprocess --------------------------------------------------------------


def test_preprocess_decodes_resizes_and_normalises(preprocess, build):
    pixels = preprocess.predict({"IMAGE": _images()})["PIXELS"]
    assert pixels.dtype == np.float32 and pixels.shape == (3, 3, 64, 64)
    assert np.isfinite(pixels).all()
    # A uniform image becomes each channel's normalised value everywhere.
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (10, 7), (30, 60, 190)).save(buffer, format="PNG")
    one = preprocess.predict({"IMAGE": np.array([[buffer.getvalue()]], dtype=object)})["PIXELS"]
    assert one.shape == (1, 3, 64, 64)
    expected = build.normalise_rgb((30, 60, 190))
    np.testing.assert_allclose(one[0], np.broadcast_to(expected[:, None, None], (3, 64, 64)), atol=1e-5)


def test_preprocess_rejects_bytes_that_are_not_an_image(preprocess):
    batch = np.array([[(SAMPLES / "ember.png").read_bytes()], [b"not an image"]], dtype=object)
    with pytest.raises(ValueError, match="IMAGE item 1"):
        preprocess.predict({"IMAGE": batch})


# -- postprocess -------------------------------------------------------------


def test_postprocess_top5_score_index_label(postprocess, build):
    logits = np.array([np.arange(10, dtype=np.float32), np.zeros(10, np.float32)])
    out = postprocess.predict({"LOGITS": logits})["LABELS"]
    assert out.dtype == object and out.shape == (2, 5)
    assert all(isinstance(item, bytes) for item in out.ravel())
    first = [item.decode().split(":") for item in out[0]]
    assert [int(index) for _, index, _ in first] == [9, 8, 7, 6, 5]
    assert [label for _, _, label in first] == build.LABELS[9:4:-1]
    p = np.exp(np.arange(10.0)) / np.exp(np.arange(10.0)).sum()
    assert [float(score) for score, _, _ in first] == pytest.approx(p[9:4:-1], abs=1e-6)
    assert out[0, 0] == f"{p[9]:f}:9:{build.LABELS[9]}".encode()
    # Equal logits: equal scores of 0.1, lower indices first.
    assert [item.decode() for item in out[1]] == [f"0.100000:{i}:{build.LABELS[i]}" for i in range(5)]


def test_postprocess_rejects_wrong_logits_width(postprocess):
    with pytest.raises(ValueError, match="LOGITS"):
        postprocess.predict({"LOGITS": np.zeros((1, 7), np.float32)})


# -- the image pipeline, step by step ----------------------------------------


def test_image_pipeline_by_hand_names_each_sample(preprocess, classifier, postprocess):
    pixels = preprocess.predict({"IMAGE": _images()})["PIXELS"]
    logits = classifier(pixels)
    assert logits.dtype == np.float32 and logits.shape == (3, 10)
    labels = postprocess.predict({"LOGITS": logits})["LABELS"]
    assert labels.shape == (3, 5)
    for name, row in zip(SAMPLE_FILES, labels, strict=True):
        parts = [item.decode().split(":") for item in row]
        scores = [float(score) for score, _, _ in parts]
        assert scores == sorted(scores, reverse=True) and 0.5 < scores[0] < 1.0, (name, row)
        assert parts[0][2] == pathlib.Path(name).stem, (name, row)
        assert len({index for _, index, _ in parts}) == 5
    # One image at a time gives the same answers as the batch.
    single = postprocess.predict({"LOGITS": classifier(preprocess.predict({"IMAGE": _images(["lagoon.jpg"])})["PIXELS"])})
    assert list(single["LABELS"][0]) == list(labels[1])


# -- the large-tensor pipeline -----------------------------------------------


def test_expand_makes_a_4mb_deterministic_tensor():
    expand = _predictor(LARGE, "expand")
    x = np.arange(16, dtype=np.float32)
    out = expand.predict({"INPUT": x})["EXPANDED"]
    assert out.dtype == np.float32 and out.shape == (1_000_000,) and out.nbytes == 4_000_000
    np.testing.assert_array_equal(out[:16], x)
    np.testing.assert_array_equal(out[16:32], 2 * x)
    np.testing.assert_array_equal(out[48:64], 4 * x)
    np.testing.assert_array_equal(out[64:80], x)
    np.testing.assert_array_equal(out, expand.predict({"INPUT": x.copy()})["EXPANDED"])
    with pytest.raises(ValueError, match="INPUT"):
        expand.predict({"INPUT": np.zeros(15, np.float32)})


def test_large_pipeline_by_hand_gives_sum_and_mean():
    expand, reduce = _predictor(LARGE, "expand"), _predictor(LARGE, "reduce")
    x = np.arange(16, dtype=np.float32)  # sum 120
    summary = reduce.predict(expand.predict({"INPUT": x}))["SUMMARY"]
    assert summary.dtype == np.float32 and summary.shape == (2,)
    np.testing.assert_array_equal(summary, np.array([18_750_000.0, 18.75], np.float32))  # 156 250 * 120
    rng = np.random.default_rng(11)
    y = rng.standard_normal(16).astype(np.float32)
    summary = reduce.predict(expand.predict({"INPUT": y}))["SUMMARY"]
    np.testing.assert_allclose(summary, [156_250 * y.sum(dtype=np.float64), 0.15625 * y.sum(dtype=np.float64)], rtol=1e-5)
    with pytest.raises(ValueError, match="EXPANDED"):
        reduce.predict({"EXPANDED": np.zeros(10, np.float32)})


# -- the image ensemble served by a real runtime ------------------------------


def test_image_pipeline_served_classifies_through_the_ensemble(start_runtime, preprocess, classifier, postprocess):
    from meshserve.clients import InferenceClient

    runtime = start_runtime("--model-repository", IMAGE, "--strict")
    with InferenceClient(runtime.address, timeout=30) as client:
        batch = client.infer("image_pipeline", {"IMAGE": _images()})["LABELS"]
        single = client.infer("image_pipeline", {"IMAGE": _images(["chalk.png"])})["LABELS"]
    assert batch.dtype == object and batch.shape == (3, 5)
    assert [row[0].decode().split(":")[2] for row in batch] == [pathlib.Path(n).stem for n in SAMPLE_FILES]
    # The same strings as the steps chained by hand.
    by_hand = postprocess.predict({"LOGITS": classifier(preprocess.predict({"IMAGE": _images()})["PIXELS"])})
    assert batch.tolist() == by_hand["LABELS"].tolist()
    assert single.shape == (1, 5) and single.tolist() == batch[2:].tolist()
