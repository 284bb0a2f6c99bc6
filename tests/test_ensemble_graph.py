"""Unit tests of the ensemble plan (runtime/ensemble_graph.py): pure, no models, no processes."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from meshserve.protos.inference import model_config_pb2 as mc
from meshserve.runtime.ensemble_graph import EnsembleError, StepModelSpec, plan_ensemble
from meshserve.runtime.tensor_spec import TensorSpec


def _spec(name, inputs, outputs, batch=8, decoupled=False, dims=(4,), datatype="FP32"):
    return StepModelSpec(name, {n: TensorSpec(n, datatype, dims) for n in inputs},
                         {n: TensorSpec(n, datatype, dims) for n in outputs}, batch, decoupled)


def _config(steps: str, batch: int = 8) -> mc.ModelConfig:
    return text_format.Parse(f"""
        name: "e" platform: "ensemble" max_batch_size: {batch}
        input [ {{ name: "I" data_type: TYPE_FP32 dims: [ 4 ] }} ]
        output [ {{ name: "O" data_type: TYPE_FP32 dims: [ -1 ] }} ]
        ensemble_scheduling {{ step [ {steps} ] }}""", mc.ModelConfig())


CHAIN = """{ model_name: "a" input_map { key: "X" value: "I" } output_map { key: "Y" value: "t" } },
           { model_name: "b" input_map { key: "X" value: "t" } output_map { key: "Y" value: "O" } }"""


def test_order_follows_tensors_and_minus_one_matches():
    plan = plan_ensemble(_config(CHAIN), {1: _spec("a", ["X"], ["Y"]), 2: _spec("b", ["X"], ["Y"])})
    assert [step.model for step in plan.order] == ["a", "b"] and plan.warnings == []


def test_step_batching_less_than_the_ensemble_is_refused():
    with pytest.raises(EnsembleError, match=r"step 2 \(model 'b'\): the model's max_batch_size 4 is less"):
        plan_ensemble(_config(CHAIN), {1: _spec("a", ["X"], ["Y"]), 2: _spec("b", ["X"], ["Y"], batch=4)})


def test_a_streaming_step_must_feed_only_ensemble_outputs():
    with pytest.raises(EnsembleError, match=r"step 1 \(model 'a'\) streams .* step 2 \(model 'b'\) input 'X'"):
        plan_ensemble(_config(CHAIN), {1: _spec("a", ["X"], ["Y"], decoupled=True), 2: _spec("b", ["X"], ["Y"])})


def test_a_tensor_written_twice_is_refused():
    steps = CHAIN + """, { model_name: "c" input_map { key: "X" value: "I" } output_map { key: "Y" value: "t" } }"""
    specs = {1: _spec("a", ["X"], ["Y"]), 2: _spec("b", ["X"], ["Y"]), 3: _spec("c", ["X"], ["Y"])}
    with pytest.raises(EnsembleError, match=r"step 3 \(model 'c'\): output 'Y' writes ensemble tensor 't', "
                                            r"already written by step 1 \(model 'a'\)"):
        plan_ensemble(_config(steps), specs)
