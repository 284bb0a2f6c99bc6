"""Reading and checking a model's ``config.pbtxt``.

Guarantees: ``load_model_config`` returns a complete ``ModelConfig`` (name,
platform or backend, inputs and outputs) or raises ``ConfigError`` naming the
file and the field. A field that parses but that meshserve does not honour is
refused, never silently ignored. A missing config is inferred only where it
safely can be: an ONNX graph declares its own tensors; a Python predictor
does not, so it needs a config.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Sequence

from google.protobuf import text_format

from meshserve.common.errors import InvalidArgument
from meshserve.protos.inference import model_config_pb2 as mc

CONFIG_FILE = "config.pbtxt"
# A real config.pbtxt is a few KiB; a bigger one is not read (a hostile file must not fill memory).
MAX_CONFIG_BYTES = 1 << 20
PYTHON_BACKEND = "python"
ONNX_PLATFORMS = ("onnxruntime_onnx", "onnxruntime")
ENSEMBLE_PLATFORM = "ensemble"
ONNX_FILE = "model.onnx"
PYTHON_FILE = "model.py"

# Fields that parse but that we do not honour, with what to do instead.
_UNSUPPORTED_FIELDS = {
    "sequence_batching": "sequence batching is not supported",
    "batch_input": "batch inputs are not supported",
    "batch_output": "batch outputs are not supported",
    "optimization": "optimization policies are not supported",
    "model_operations": "custom operation libraries are not supported",
    "model_repository_agents": "repository agents are not supported",
    "cc_model_filenames": "compute-capability model files are not supported",
}


_UNKNOWN_FIELD = re.compile(r'has no field named "([^"]+)"')


class ConfigError(InvalidArgument):
    """A model configuration that cannot be served; the message names file and field."""


def _refuse(path: pathlib.Path, field: str, why: str) -> ConfigError:
    return ConfigError(f"{path}: field '{field}' is not supported: {why}")


def parse_config_file(path: pathlib.Path) -> mc.ModelConfig:
    """Parse a config.pbtxt; an unknown field is reported as unsupported, with its line."""
    if not path.is_file():  # a FIFO or device would block or never end the read
        raise ConfigError(f"{path}: not a regular file")
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes (not a model configuration)")
    try:
        return text_format.Parse(data.decode("utf-8"), mc.ModelConfig())
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except text_format.ParseError as err:
        text = str(err)
        unknown = _UNKNOWN_FIELD.search(text)
        if unknown:
            field = unknown.group(1)
            raise ConfigError(f"{path}: field '{field}' is not supported by meshserve ({text})") from None
        raise ConfigError(f"{path}: cannot parse: {text}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read (not a model configuration)") from None


def version_folders(model_dir: pathlib.Path) -> list[int]:
    """The numbered version folders of a model, ascending."""
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _infer_platform(model_dir: pathlib.Path) -> str:
    for version in reversed(version_folders(model_dir)):
        folder = model_dir / str(version)
        if (folder / ONNX_FILE).exists():
            return ONNX_PLATFORMS[0]
        if (folder / PYTHON_FILE).exists():
            return PYTHON_BACKEND
    raise ConfigError(
        f"{model_dir}: no {CONFIG_FILE} and no version folder with {ONNX_FILE} or {PYTHON_FILE}"
    )


def load_model_config(model_dir: pathlib.Path) -> mc.ModelConfig:
    """Read, default and validate the configuration of the model in ``model_dir``."""
    path = model_dir / CONFIG_FILE
    if path.exists():
        config = parse_config_file(path)
    else:
        config = mc.ModelConfig()
    if not config.backend and not config.platform:
        inferred = _infer_platform(model_dir)
        if inferred == PYTHON_BACKEND and not path.exists():
            raise ConfigError(
                f"{path}: missing, and a python model's inputs and outputs cannot be inferred; write one"
            )
        if inferred == PYTHON_BACKEND:
            config.backend = PYTHON_BACKEND
        else:
            config.platform = inferred
    if not config.name:
        config.name = model_dir.name
    elif config.name != model_dir.name:
        raise ConfigError(f"{path}: field 'name' is {config.name!r} but the model folder is {model_dir.name!r}")
    validate(config, path)
    return config


def is_onnx(config: mc.ModelConfig) -> bool:
    return config.platform in ONNX_PLATFORMS or config.backend == "onnxruntime"


def _is_set(message, field: str) -> bool:
    try:
        return message.HasField(field)
    except ValueError:  # repeated and map fields have no presence: non-empty means set
        return len(getattr(message, field)) > 0


def validate(config: mc.ModelConfig, path: pathlib.Path) -> None:
    """Refuse what we do not honour and what cannot be served; names file and field."""
    for field, why in _UNSUPPORTED_FIELDS.items():
        if _is_set(config, field):
            raise _refuse(path, field, why)
    if config.platform == ENSEMBLE_PLATFORM or config.HasField("ensemble_scheduling"):
        _validate_ensemble(config, path)
        return
    if config.backend not in ("", PYTHON_BACKEND, "onnxruntime") or (
        config.platform and config.platform not in ONNX_PLATFORMS
    ):
        raise _refuse(
            path, "backend" if config.backend else "platform",
            f"'{config.backend or config.platform}'; supported: backend \"python\", "
            f"platform \"onnxruntime_onnx\"",
        )
    if config.response_cache.enable:
        raise _refuse(path, "response_cache.enable", "the response cache is not supported")
    if config.max_batch_size < 0:
        raise ConfigError(f"{path}: field 'max_batch_size' must be >= 0, got {config.max_batch_size}")
    if config.HasField("dynamic_batching"):
        _validate_dynamic_batching(config, path)
    for index, group in enumerate(config.instance_group):
        where = f"instance_group[{index}]"
        if group.count < 0:
            raise ConfigError(f"{path}: field '{where}.count' must be >= 0, got {group.count}")
        if group.HasField("rate_limiter"):
            raise _refuse(path, f"{where}.rate_limiter", "rate limiting is not supported")
        if group.kind == mc.ModelInstanceGroup.KIND_MODEL:
            raise _refuse(path, f"{where}.kind", "KIND_MODEL is not supported; use KIND_CPU or KIND_GPU")
        if group.profile or group.secondary_devices or group.passive or group.host_policy:
            raise _refuse(path, where, "profile, secondary_devices, passive and host_policy are not supported")
    _validate_tensors(config, path)


def is_ensemble(config: mc.ModelConfig) -> bool:
    return config.platform == ENSEMBLE_PLATFORM


def _validate_ensemble(config: mc.ModelConfig, path: pathlib.Path) -> None:
    """What an ensemble's own file must hold; its steps are checked against their models at load."""
    if config.platform != ENSEMBLE_PLATFORM:
        raise ConfigError(f"{path}: field 'ensemble_scheduling' needs platform \"{ENSEMBLE_PLATFORM}\"")
    if config.backend:
        raise ConfigError(f"{path}: field 'backend' must be empty for platform \"{ENSEMBLE_PLATFORM}\"")
    if not config.ensemble_scheduling.step:
        raise ConfigError(f"{path}: platform \"{ENSEMBLE_PLATFORM}\" needs 'ensemble_scheduling' with at least one step")
    for field, why in (
        ("dynamic_batching", "an ensemble does not batch; set dynamic_batching on its step models"),
        ("instance_group", "an ensemble runs no instances of its own; set instance_group on its step models"),
        ("version_policy", "an ensemble serves one version"),
    ):
        if _is_set(config, field):
            raise _refuse(path, field, why)
    if config.response_cache.enable:
        raise _refuse(path, "response_cache.enable", "the response cache is not supported")
    if config.max_batch_size < 0:
        raise ConfigError(f"{path}: field 'max_batch_size' must be >= 0, got {config.max_batch_size}")
    for index, step in enumerate(config.ensemble_scheduling.step):
        where = f"ensemble_scheduling.step[{index}]"
        if not step.model_name:
            raise ConfigError(f"{path}: field '{where}.model_name' is empty")
        if step.model_namespace:
            raise _refuse(path, f"{where}.model_namespace", "model namespaces are not supported")
        if step.model_version < -1:  # -1 (or unset, 0): the latest version
            raise ConfigError(f"{path}: field '{where}.model_version' must be -1 (latest) or a version "
                              f"number, got {step.model_version}")
        if not step.output_map:
            raise ConfigError(f"{path}: field '{where}.output_map' is empty (step model '{step.model_name}')")
    if not config.input or not config.output:
        raise ConfigError(f"{path}: ensemble '{config.name}' declares no "
                          f"{'inputs' if not config.input else 'outputs'}")
    _validate_tensors(config, path)


def _validate_dynamic_batching(config: mc.ModelConfig, path: pathlib.Path) -> None:
    batching = config.dynamic_batching
    if config.max_batch_size == 0:
        raise ConfigError(f"{path}: field 'dynamic_batching' needs 'max_batch_size' > 0")
    for size in batching.preferred_batch_size:
        if not 0 < size <= config.max_batch_size:
            raise ConfigError(
                f"{path}: field 'dynamic_batching.preferred_batch_size' has {size}, "
                f"outside 1..max_batch_size ({config.max_batch_size})"
            )
    if batching.priority_levels or batching.priority_queue_policy:
        raise _refuse(path, "dynamic_batching.priority_levels", "priority queues are not supported")
    if batching.default_queue_policy.timeout_action == mc.ModelQueuePolicy.DELAY:
        raise _refuse(path, "dynamic_batching.default_queue_policy.timeout_action",
                      "only REJECT is supported")
    if batching.preserve_ordering and instance_count(config) > 1:
        raise _refuse(path, "dynamic_batching.preserve_ordering", "only with a single instance")


def _validate_tensors(config: mc.ModelConfig, path: pathlib.Path) -> None:
    inputs_and_outputs: tuple[tuple[str, Sequence[mc.ModelInput | mc.ModelOutput]], ...] = (
        ("input", config.input), ("output", config.output))
    for kind, tensors in inputs_and_outputs:
        seen = set()
        for index, tensor in enumerate(tensors):
            where = f"{kind}[{index}]"
            if not tensor.name:
                raise ConfigError(f"{path}: field '{where}.name' is empty")
            if tensor.name in seen:
                raise ConfigError(f"{path}: {kind} '{tensor.name}' is declared twice")
            seen.add(tensor.name)
            if tensor.data_type == mc.TYPE_INVALID:
                raise ConfigError(f"{path}: field '{where}.data_type' is missing for '{tensor.name}'")
            if any(dim < -1 or dim == 0 for dim in tensor.dims):
                raise ConfigError(f"{path}: field '{where}.dims' of '{tensor.name}' must be > 0 or -1")
            if tensor.HasField("reshape"):
                raise _refuse(path, f"{where}.reshape", "reshape is not supported")
            if tensor.is_shape_tensor:
                raise _refuse(path, f"{where}.is_shape_tensor", "shape tensors are not supported")
            if isinstance(tensor, mc.ModelInput) and tensor.allow_ragged_batch:
                raise _refuse(path, f"{where}.allow_ragged_batch", "ragged batches are not supported")


def instance_count(config: mc.ModelConfig) -> int:
    """Concurrent executions: the sum of instance_group counts (1 when none is given)."""
    if not config.instance_group:
        return 1
    return max(1, sum(group.count or 1 for group in config.instance_group))


def wants_gpu(config: mc.ModelConfig) -> bool:
    return any(group.kind == mc.ModelInstanceGroup.KIND_GPU for group in config.instance_group)


def is_decoupled(config: mc.ModelConfig) -> bool:
    return config.model_transaction_policy.decoupled


def selected_versions(config: mc.ModelConfig, available: list[int]) -> list[int]:
    """Apply the version policy (default: the latest one) to the available versions."""
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return list(available)
    if choice == "specific":
        return [v for v in available if v in set(policy.specific.versions)]
    count = policy.latest.num_versions if choice == "latest" and policy.latest.num_versions else 1
    return available[-count:]
