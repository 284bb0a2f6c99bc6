"""What a Triton python model is told about itself: its config as Triton's JSON, its ``initialize`` args.

Guarantees: ``config_as_dict`` is the config as Triton shows it to a model
(proto field names, fields without presence printed with their defaults,
int64 as JSON numbers, enums by name); ``initialize_args`` holds Triton's
seven keys, every value a string; ``auto_complete`` takes from a model's
``auto_complete_config`` only what Triton lets it set (inputs, outputs,
max_batch_size, dynamic batching, the transaction policy) and refuses a
config that does not parse, naming the model.
"""

from __future__ import annotations

import json

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from meshserve.protos.inference import model_config_pb2 as mc

from ..config import ConfigError
from . import LoadContext
from . import triton_python_backend_utils as pb_utils

_INT64 = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)


def _numbers_for_int64(descriptor, value: dict) -> None:
    """json_format writes int64 fields as strings; Triton's JSON has numbers (``"dims": [4]``)."""
    for field in descriptor.fields:
        if field.name not in value:
            continue
        item = value[field.name]
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                inner = field.message_type.fields_by_name["value"]
                if inner.message_type is not None:
                    for entry in item.values():
                        _numbers_for_int64(inner.message_type, entry)
            elif field.is_repeated:
                for entry in item:
                    _numbers_for_int64(field.message_type, entry)
            else:
                _numbers_for_int64(field.message_type, item)
        elif field.cpp_type in _INT64:
            value[field.name] = [int(v) for v in item] if field.is_repeated else int(item)


def config_as_dict(config: mc.ModelConfig) -> dict:
    """The config as Triton shows it to a model: proto field names, every field, int64 as numbers."""
    value = json_format.MessageToDict(config, preserving_proto_field_name=True,
                                      always_print_fields_with_no_presence=True)
    _numbers_for_int64(config.DESCRIPTOR, value)
    return value


def initialize_args(context: LoadContext, index: int) -> dict[str, str]:
    """Triton's ``initialize`` args: every key and value a string."""
    gpu = context.device.startswith("cuda")
    return {
        "model_config": json.dumps(config_as_dict(context.config)),
        "model_instance_kind": "GPU" if gpu else "CPU",
        "model_instance_name": f"{context.config.name}_{index}",
        "model_instance_device_id": context.device.split(":")[1] if gpu else "0",
        "model_repository": str(context.version_dir.parent),
        "model_version": context.version,
        "model_name": context.config.name,
    }


def auto_complete(context: LoadContext, cls) -> None:
    """Run ``auto_complete_config`` and take its inputs, outputs, batching and transaction policy."""
    config = pb_utils.ModelConfig(config_as_dict(context.config))
    result = cls.auto_complete_config(config)
    completed = (result if result is not None else config).as_dict()
    try:
        parsed = json_format.ParseDict(completed, mc.ModelConfig())
    except json_format.ParseError as err:
        raise ConfigError(f"auto_complete_config of model '{context.config.name}' returned a bad config: {err}") \
            from None
    target = context.config
    for field in ("input", "output"):
        target.ClearField(field)
        getattr(target, field).extend(getattr(parsed, field))
    target.max_batch_size = parsed.max_batch_size
    if parsed.HasField("dynamic_batching") and not target.HasField("dynamic_batching"):
        target.dynamic_batching.CopyFrom(parsed.dynamic_batching)
    target.model_transaction_policy.CopyFrom(parsed.model_transaction_policy)
