"""Ensemble tracing: one span per step under the ensemble request's span (real runtime, real OTLP receiver)."""

from __future__ import annotations

import numpy as np
from otlp_receiver import OtlpReceiver
from test_ensemble import ENSEMBLES, RPC_TIMEOUT_S
from test_tracing import SPAN_TIMEOUT_S, tracing_env

from meshserve.clients import InferenceClient


def test_each_step_has_its_span_with_queue_and_compute_time(start_runtime):
    with OtlpReceiver() as receiver:
        runtime = start_runtime("--model-repository", ENSEMBLES, "--model", "diamond", env=tracing_env(receiver))
        with InferenceClient(runtime.address, timeout=RPC_TIMEOUT_S) as client:
            client.infer("diamond", {"INPUT": np.ones((1, 4), np.float32)}, request_id="traced")

        def complete(spans) -> bool:
            steps = [s for s in spans if s.name.startswith("step ")]
            return any(s.name == "ModelInfer diamond" for s in spans) and len(steps) == 4 and \
                sum(s.name == "execute" for s in spans) >= 4

        spans = receiver.wait_for(complete, SPAN_TIMEOUT_S)
    server = next(s for s in spans if s.name == "ModelInfer diamond")
    steps = {s.name: s for s in spans if s.parent_span_id == server.span_id}
    assert set(steps) == {"step 1 join", "step 2 double", "step 3 add_one", "step 4 square"}
    for step in steps.values():
        assert step.trace_id == server.trace_id
        assert step.attributes["meshserve.step.queue_ns"] >= 0
        assert step.attributes["meshserve.step.compute_ns"] > 0
        children = {s.name for s in spans if s.parent_span_id == step.span_id}
        assert children == {"queue", "execute"}, (step.name, children)
