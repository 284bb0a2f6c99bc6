"""An ensemble's steps as a checked DAG of tensors (Triton ensemble semantics).

``plan_ensemble`` takes the ensemble's config and what each step's model
declares, and either returns an ``EnsemblePlan`` or raises ``EnsembleError``
naming the step and the tensor. It is pure: no models, no I/O, so every rule
is tested alone. Steps are numbered from 1 in config order ("step 2" is
``ensemble_scheduling.step[1]``).

Refused: a step input or output the step model does not declare, a required
step input left unmapped, a tensor read that is neither an ensemble input nor
a step output, a tensor produced twice, a cycle, an ensemble output no step
produces, a datatype or shape that differs between producer and consumer
(shapes compared with the batch axis included; -1 matches anything), a step
model that batches less than the ensemble, and a streaming (decoupled) step
whose responses would feed another step, or more than one streaming step.
Warned (returned in ``warnings``, the model still loads): a step output and an
ensemble input that nothing reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

from meshserve.protos.inference import model_config_pb2 as mc

from .config import ConfigError
from .tensor_spec import TensorSpec


class EnsembleError(ConfigError):
    """An ensemble that cannot run; the message names the ensemble, the step and the tensor."""


@dataclass(frozen=True)
class StepModelSpec:
    """What a step's model declares (read from its config, local or remote)."""

    name: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    max_batch_size: int
    decoupled: bool

    @classmethod
    def from_config(cls, config: mc.ModelConfig) -> StepModelSpec:
        return cls(
            name=config.name,
            inputs={t.name: TensorSpec.from_config(t) for t in config.input},
            outputs={t.name: TensorSpec.from_config(t) for t in config.output},
            max_batch_size=config.max_batch_size,
            decoupled=config.model_transaction_policy.decoupled,
        )


@dataclass(frozen=True)
class Step:
    """One step: which model (version "" = latest) and how its tensors map to the ensemble's."""

    number: int  # 1-based, config order
    model: str
    version: str
    input_map: dict[str, str]   # step input name -> ensemble tensor
    output_map: dict[str, str]  # step output name -> ensemble tensor

    @property
    def label(self) -> str:
        return f"step {self.number} (model '{self.model}')"


@dataclass
class EnsemblePlan:
    steps: list[Step]
    order: list[Step]                      # a topological order
    producers: dict[str, Step]             # ensemble tensor -> the step that writes it
    streaming: Step | None = None          # the decoupled step, if any (a sink)
    warnings: list[str] = field(default_factory=list)


def steps_of(config: mc.ModelConfig) -> list[Step]:
    return [
        Step(number=index + 1, model=step.model_name,
             version="" if step.model_version <= 0 else str(step.model_version),
             input_map=dict(step.input_map), output_map=dict(step.output_map))
        for index, step in enumerate(config.ensemble_scheduling.step)
    ]


def full_shape(dims, max_batch_size: int) -> list[int]:
    """A tensor's shape with its batch axis (-1) when the model batches."""
    return ([-1] if max_batch_size > 0 else []) + list(dims)


def shapes_match(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == -1 or y == -1 or x == y for x, y in zip(a, b, strict=True))


def plan_ensemble(config: mc.ModelConfig, specs: dict[int, StepModelSpec]) -> EnsemblePlan:
    """Check the ensemble against its step models (``specs`` by step number); see the module docstring."""
    name = config.name

    def fail(message: str) -> EnsembleError:
        return EnsembleError(f"ensemble '{name}' {message}")

    steps = steps_of(config)
    ensemble_inputs = {t.name: TensorSpec.from_config(t) for t in config.input}
    ensemble_outputs = {t.name: TensorSpec.from_config(t) for t in config.output}
    batch = config.max_batch_size

    # Each step's tensors against its model's declaration.
    for step in steps:
        spec = specs[step.number]
        for step_input in step.input_map:
            if step_input not in spec.inputs:
                raise fail(f"{step.label}: input_map key '{step_input}' is not an input of model "
                           f"'{step.model}' (it has {', '.join(sorted(spec.inputs))})")
        for step_output in step.output_map:
            if step_output not in spec.outputs:
                raise fail(f"{step.label}: output_map key '{step_output}' is not an output of model "
                           f"'{step.model}' (it has {', '.join(sorted(spec.outputs))})")
        for input_name, input_spec in spec.inputs.items():
            if input_name not in step.input_map and not input_spec.optional:
                raise fail(f"{step.label}: required input '{input_name}' is not in its input_map")
        if batch > 0 and spec.max_batch_size < batch:
            raise fail(f"{step.label}: the model's max_batch_size {spec.max_batch_size} is less than "
                       f"the ensemble's {batch}")

    # Who writes each tensor.
    producers: dict[str, Step] = {}
    for step in steps:
        for step_output, tensor in step.output_map.items():
            if tensor in ensemble_inputs:
                raise fail(f"{step.label}: output '{step_output}' writes ensemble tensor '{tensor}', "
                           f"which is an ensemble input")
            if tensor in producers:
                raise fail(f"{step.label}: output '{step_output}' writes ensemble tensor '{tensor}', "
                           f"already written by {producers[tensor].label}")
            producers[tensor] = step
    for step in steps:
        for step_input, tensor in step.input_map.items():
            if tensor not in producers and tensor not in ensemble_inputs:
                raise fail(f"{step.label}: input '{step_input}' reads ensemble tensor '{tensor}', "
                           f"which is neither an ensemble input nor any step's output")
    for output in ensemble_outputs:
        if output not in producers:
            raise fail(f"output '{output}' is produced by no step")

    order = _topological_order(steps, producers, fail)
    _check_types(config, steps, specs, producers, ensemble_inputs, ensemble_outputs, fail)
    streaming = _streaming_step(steps, specs, ensemble_outputs, fail)

    read = {tensor for step in steps for tensor in step.input_map.values()} | set(ensemble_outputs)
    warnings = [
        f"ensemble '{name}' {step.label}: output '{step_output}' (ensemble tensor '{tensor}') is never used"
        for step in steps for step_output, tensor in step.output_map.items() if tensor not in read
    ] + [f"ensemble '{name}': input '{tensor}' is never used" for tensor in ensemble_inputs if tensor not in read]
    return EnsemblePlan(steps=steps, order=order, producers=producers, streaming=streaming, warnings=warnings)


def _topological_order(steps: list[Step], producers: dict[str, Step], fail) -> list[Step]:
    """Kahn's order; a cycle is reported as its steps and the tensors that link them."""
    after = {step.number: {producers[t].number for t in step.input_map.values() if t in producers}
             for step in steps}
    by_number = {step.number: step for step in steps}
    order: list[Step] = []
    done: set[int] = set()
    while len(order) < len(steps):
        ready = [n for n, deps in after.items() if n not in done and deps <= done]
        if not ready:
            raise fail(f"has a cycle: {_describe_cycle(by_number, after, producers, done)}")
        for number in ready:
            done.add(number)
            order.append(by_number[number])
    return order


def _describe_cycle(by_number, after, producers, done) -> str:
    # Walk back along "needs" edges from any blocked step until a step repeats.
    number = next(n for n in sorted(after) if n not in done)
    path = [number]
    while True:
        number = min(dep for dep in after[number] if dep not in done)
        if number in path:
            path = path[path.index(number):] + [number]
            break
        path.append(number)
    path.reverse()  # producer -> consumer
    parts = []
    for producer, consumer in pairwise(path):
        tensor = next(t for t in by_number[consumer].input_map.values()
                      if t in producers and producers[t].number == producer)
        parts.append(f"{by_number[producer].label} -> '{tensor}' ->")
    return " ".join(parts) + f" {by_number[path[-1]].label}"


def _check_types(config, steps, specs, producers, ensemble_inputs, ensemble_outputs, fail) -> None:
    batch = config.max_batch_size

    def produced(tensor: str) -> tuple[TensorSpec, list[int], str]:
        if tensor in ensemble_inputs:
            spec = ensemble_inputs[tensor]
            return spec, full_shape(spec.dims, batch), f"ensemble input '{tensor}'"
        step = producers[tensor]
        model = specs[step.number]
        output = next(o for o, t in step.output_map.items() if t == tensor)
        spec = model.outputs[output]
        return spec, full_shape(spec.dims, model.max_batch_size), f"{step.label} output '{output}'"

    def check(tensor: str, consumer: TensorSpec, consumer_shape: list[int], where: str) -> None:
        source, source_shape, source_where = produced(tensor)
        if source.datatype != consumer.datatype:
            raise fail(f"{where} reads ensemble tensor '{tensor}' as {consumer.datatype}, but "
                       f"{source_where} is {source.datatype}")
        if not shapes_match(source_shape, consumer_shape):
            raise fail(f"{where} reads ensemble tensor '{tensor}' with shape {consumer_shape}, but "
                       f"{source_where} has shape {source_shape}")

    for step in steps:
        model = specs[step.number]
        for step_input, tensor in step.input_map.items():
            spec = model.inputs[step_input]
            check(tensor, spec, full_shape(spec.dims, model.max_batch_size), f"{step.label}: input '{step_input}'")
    for name, spec in ensemble_outputs.items():
        check(name, spec, full_shape(spec.dims, batch), f"output '{name}'")


def _streaming_step(steps, specs, ensemble_outputs, fail) -> Step | None:
    streaming = [step for step in steps if specs[step.number].decoupled]
    if len(streaming) > 1:
        raise fail(f"has more than one streaming (decoupled) step: "
                   f"{', '.join(step.label for step in streaming)}; only one is supported")
    if not streaming:
        return None
    step = streaming[0]
    for other in steps:
        for step_input, tensor in other.input_map.items():
            if tensor in step.output_map.values():
                raise fail(f"{step.label} streams (decoupled), but {other.label} input '{step_input}' "
                           f"reads its tensor '{tensor}'; a streaming step must feed only ensemble outputs")
    return step
