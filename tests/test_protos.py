"""Wire compatibility of protos/inference with Triton's own generated protos.

Our ``protos/inference/*.proto`` are written by us; tritonclient ships the
code protoc generated from Triton's. The two cannot be imported into one
process: both register ``inference.*`` in protobuf's default descriptor pool
and the second import fails with "duplicate symbol". So Triton's side runs
once per module in a child process (``_TRITON_SIDE``) that imports
tritonclient's real modules and reports back:

* the serialized FileDescriptorProtos of Triton's two files, which this
  process loads into a private DescriptorPool and compares, message by
  message and field by field, with ours;
* every sample message of ``_BUILDERS`` built with tritonclient's classes and
  serialized, which this process parses with ours;
* every sample message built with our classes, as tritonclient's classes
  parsed it.

The same builder functions run on both sides (their source is sent to the
child), so each round trip compares a message with its twin built by the
other side's classes: equal decoded values, byte-identical deterministic
encodings and no unknown fields in either direction.
"""

from __future__ import annotations

import base64
import collections
import inspect
import json
import pathlib
import subprocess
import sys
import textwrap

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format
from google.protobuf.descriptor import FieldDescriptor

from meshserve.protos.inference import grpc_service_pb2, model_config_pb2

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVICE = "inference.GRPCInferenceService"

# Fields of Triton's model configuration that meshserve deliberately does not
# define, keyed by full field name, with the reason. Any other Triton field
# missing from our protos fails test_everything_reachable_from_the_rpcs_exists.
# Keep this empty unless a field is dropped on purpose: a config.pbtxt that
# sets a dropped field no longer parses with protobuf's text format.
INTENTIONALLY_MISSING: dict[str, str] = {}

# Our fields that the installed tritonclient (the reference above) lacks
# because Triton added them after that release, pinned to the number and type
# in Triton's current published protos. test_fields_newer_than_the_reference_
# are_pinned fails on one of these renumbered or retyped, and on any field of
# ours the reference does not have and this list does not name.
NEWER_THAN_REFERENCE: dict[str, tuple[int, str]] = {
    "inference.ModelStatistics.response_stats": (9, "map<string, inference.InferResponseStatistics>"),
    "inference.InferResponseStatistics.compute_infer": (1, "inference.StatisticDuration"),
    "inference.InferResponseStatistics.compute_output": (2, "inference.StatisticDuration"),
    "inference.InferResponseStatistics.success": (3, "inference.StatisticDuration"),
    "inference.InferResponseStatistics.fail": (4, "inference.StatisticDuration"),
    "inference.InferResponseStatistics.empty_response": (5, "inference.StatisticDuration"),
    "inference.InferResponseStatistics.cancel": (6, "inference.StatisticDuration"),
    "inference.ModelConfig.runtime": (25, "string"),
    "inference.ModelInput.is_non_linear_format_io": (9, "bool"),
    "inference.ModelOutput.is_non_linear_format_io": (7, "bool"),
}


# --- sample messages ----------------------------------------------------------
# Each builder takes (service module, model config module) and only uses
# those: it runs here with ours and in the child with tritonclient's.


def build_infer_request(svc, mc):
    req = svc.ModelInferRequest(model_name="mlp_onnx", model_version="3", id="req-42")
    req.parameters["sequence_id"].int64_param = -7
    req.parameters["sequence_start"].bool_param = True
    req.parameters["priority"].uint64_param = 2**64 - 2
    req.parameters["timeout"].double_param = 0.125
    req.parameters["tenant"].string_param = "équipe-α"
    # Triton rejects mixing raw_input_contents with contents in one request;
    # the wire does not, and this checks every contents field at once.
    raw = req.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 3])
    raw.parameters["binary_data_size"].int64_param = 24
    typed = req.inputs.add(name="INPUT1", datatype="INT64", shape=[1, 4])
    typed.contents.int64_contents.extend([-(2**63), -1, 0, 2**63 - 1])
    typed.contents.bool_contents.extend([True, False, True])
    typed.contents.int_contents.extend([-(2**31), 2**31 - 1])
    typed.contents.uint_contents.extend([0, 2**32 - 1])
    typed.contents.uint64_contents.extend([2**64 - 1])
    typed.contents.fp32_contents.extend([0.5, -1.25, 3.0e38])
    typed.contents.fp64_contents.extend([1e-300, -2.5])
    text = req.inputs.add(name="INPUT2", datatype="BYTES", shape=[2])
    text.contents.bytes_contents.extend([b"\x00\xff\x80", "hé".encode()])
    text.parameters["shared_memory_region"].string_param = "region0"
    text.parameters["shared_memory_offset"].uint64_param = 64
    out = req.outputs.add(name="OUTPUT0")
    out.parameters["classification"].int64_param = 3
    req.outputs.add(name="OUTPUT1").parameters["binary_data"].bool_param = True
    req.raw_input_contents.append(bytes(range(24)))
    req.raw_input_contents.append(b"")
    return req


def _fill_infer_response(resp):
    resp.model_name = "mlp_onnx"
    resp.model_version = "3"
    resp.id = "req-42"
    resp.parameters["triton_final_response"].bool_param = True
    resp.parameters["sequence_id"].uint64_param = 9
    raw = resp.outputs.add(name="OUTPUT0", datatype="FP32", shape=[2, 3])
    raw.parameters["binary_data_size"].int64_param = 24
    typed = resp.outputs.add(name="OUTPUT1", datatype="BYTES", shape=[1])
    typed.contents.bytes_contents.append(b"label:cat")
    typed.contents.fp64_contents.append(0.75)
    typed.parameters["classification"].string_param = "top1"
    resp.raw_output_contents.append(bytes(range(100, 124)))


def build_infer_response(svc, mc):
    resp = svc.ModelInferResponse()
    _fill_infer_response(resp)
    return resp


def build_stream_infer_response(svc, mc):
    stream = svc.ModelStreamInferResponse()
    _fill_infer_response(stream.infer_response)
    return stream


def build_stream_error_response(svc, mc):
    stream = svc.ModelStreamInferResponse(error_message="in[0]: expected FP32, got INT8")
    stream.infer_response.id = "req-43"
    return stream


def build_config_dynamic(svc, mc):
    cfg = mc.ModelConfig(name="mlp_onnx", platform="onnxruntime_onnx", backend="onnxruntime")
    cfg.max_batch_size = 8
    cfg.version_policy.specific.versions.extend([1, 3])
    inp = cfg.input.add(name="INPUT0", data_type=mc.TYPE_FP32, format=mc.ModelInput.FORMAT_NCHW)
    inp.dims.extend([-1, 4])
    inp.reshape.shape.extend([4])
    inp.allow_ragged_batch = True
    inp.optional = True
    out = cfg.output.add(name="OUTPUT0", data_type=mc.TYPE_BF16, label_filename="labels.txt")
    out.dims.extend([3])
    dyn = cfg.dynamic_batching
    dyn.preferred_batch_size.extend([4, 8])
    dyn.max_queue_delay_microseconds = 100
    dyn.preserve_ordering = True
    dyn.priority_levels = 2
    dyn.default_priority_level = 1
    dyn.default_queue_policy.timeout_action = mc.ModelQueuePolicy.DELAY
    dyn.default_queue_policy.default_timeout_microseconds = 5000
    dyn.default_queue_policy.allow_timeout_override = True
    dyn.default_queue_policy.max_queue_size = 64
    dyn.priority_queue_policy[2].max_queue_size = 16
    gpu = cfg.instance_group.add(name="gpus", kind=mc.ModelInstanceGroup.KIND_GPU, count=2)
    gpu.gpus.extend([0, 1])
    gpu.rate_limiter.priority = 1
    gpu.rate_limiter.resources.add(name="R1", count=4)
    gpu.rate_limiter.resources.add(name="G", **{"global": True}, count=1)
    gpu.host_policy = "numa0"
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1, passive=True)
    cfg.model_transaction_policy.decoupled = True
    cfg.parameters["EXECUTION_ENV_PATH"].string_value = "$$TRITON_MODEL_DIRECTORY/env"
    cfg.metric_tags["team"] = "search"
    cfg.response_cache.enable = True
    cfg.optimization.input_pinned_memory.enable = True
    return cfg


def build_config_ensemble(svc, mc):
    cfg = mc.ModelConfig(name="pipeline", platform="ensemble", max_batch_size=0)
    cfg.input.add(name="RAW", data_type=mc.TYPE_STRING).dims.append(1)
    cfg.output.add(name="SCORES", data_type=mc.TYPE_FP32).dims.extend([-1, 10])
    pre = cfg.ensemble_scheduling.step.add(model_name="tokenizer", model_version=-1)
    pre.input_map["TEXT"] = "RAW"
    pre.output_map["IDS"] = "ids"
    main = cfg.ensemble_scheduling.step.add(model_name="classifier", model_version=2)
    main.input_map["INPUT_IDS"] = "ids"
    main.output_map["LOGITS"] = "SCORES"
    cfg.model_transaction_policy.decoupled = False
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_MODEL)
    return cfg


def build_config_response(svc, mc):
    resp = svc.ModelConfigResponse()
    resp.config.CopyFrom(build_config_dynamic(svc, mc))
    return resp


_BUILDERS = {
    "ModelInferRequest": build_infer_request,
    "ModelInferResponse": build_infer_response,
    "ModelStreamInferResponse": build_stream_infer_response,
    "ModelStreamInferResponse(error)": build_stream_error_response,
    "ModelConfig(dynamic_batching)": build_config_dynamic,
    "ModelConfig(ensemble_scheduling)": build_config_ensemble,
    "ModelConfigResponse": build_config_response,
}
# Helpers the builders call, sent to the child with them.
_BUILDER_HELPERS = [_fill_infer_response, build_config_dynamic]


# --- Triton's side, in a child process ----------------------------------------

_TRITON_SIDE = r"""
import base64, json, sys, traceback
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2

job = json.load(sys.stdin)
namespace = {}
exec(job["source"], namespace)

def b64(data):
    return base64.b64encode(data).decode("ascii")

def unknown_free(msg):
    copy = type(msg)()
    copy.CopyFrom(msg)
    copy.DiscardUnknownFields()
    return copy.SerializeToString(deterministic=True) == msg.SerializeToString(deterministic=True)

out = {
    # dependency order: grpc_service.proto imports model_config.proto
    "files": [b64(model_config_pb2.DESCRIPTOR.serialized_pb), b64(service_pb2.DESCRIPTOR.serialized_pb)],
    "built": {},
    "parsed": {},
}
for key, function in job["builders"].items():
    try:
        built = namespace[function](service_pb2, model_config_pb2)
    except Exception:
        out["built"][key] = {"error": traceback.format_exc()}
        continue
    out["built"][key] = {
        "type": built.DESCRIPTOR.full_name,
        "wire": b64(built.SerializeToString(deterministic=True)),
        "dict": json_format.MessageToDict(built, preserving_proto_field_name=True),
    }
    if job["ours"].get(key) is None:
        continue
    parsed = type(built).FromString(base64.b64decode(job["ours"][key]))
    out["parsed"][key] = {
        "equals_built": parsed == built,
        "unknown_free": unknown_free(parsed),
        "wire": b64(parsed.SerializeToString(deterministic=True)),
        "dict": json_format.MessageToDict(parsed, preserving_proto_field_name=True),
    }
json.dump(out, sys.stdout)
"""


def _builder_source() -> str:
    functions = {*_BUILDER_HELPERS, *_BUILDERS.values()}
    return "\n\n".join(textwrap.dedent(inspect.getsource(f)) for f in sorted(functions, key=lambda f: f.__name__))


def _our_message(key: str):
    return _BUILDERS[key](grpc_service_pb2, model_config_pb2)


def _our_wire(key: str) -> str | None:
    """Our sample, encoded for the child; None when our classes cannot build it
    (the round-trip tests then fail on the builder's own error)."""
    try:
        message = _our_message(key)
    except Exception:
        return None
    return base64.b64encode(message.SerializeToString(deterministic=True)).decode("ascii")


def _unknown_free(msg) -> bool:
    copy = type(msg)()
    copy.CopyFrom(msg)
    copy.DiscardUnknownFields()
    return copy.SerializeToString(deterministic=True) == msg.SerializeToString(deterministic=True)


@pytest.fixture(scope="module")
def triton():
    job = {
        "source": _builder_source(),
        "builders": {key: fn.__name__ for key, fn in _BUILDERS.items()},
        "ours": {key: _our_wire(key) for key in _BUILDERS},
    }
    proc = subprocess.run(
        # -P: do not put the repository on the child's sys.path
        [sys.executable, "-P", "-c", _TRITON_SIDE],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, f"tritonclient side failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def triton_files(triton):
    pool = descriptor_pool.DescriptorPool()
    files = []
    for encoded in triton["files"]:
        proto = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(encoded))
        pool.Add(proto)
        files.append(pool.FindFileByName(proto.name))
    return files


# --- descriptor walking -------------------------------------------------------


def _messages(file):
    def walk(message):
        yield message
        for nested in message.nested_types:
            yield from walk(nested)

    for message in file.message_types_by_name.values():
        yield from walk(message)


def _enums(file):
    yield from file.enum_types_by_name.values()
    for message in _messages(file):
        yield from message.enum_types


def _index(files):
    messages = {m.full_name: m for f in files for m in _messages(f)}
    enums = {e.full_name: e for f in files for e in _enums(f)}
    return messages, enums


OUR_FILES = [model_config_pb2.DESCRIPTOR, grpc_service_pb2.DESCRIPTOR]
OUR_MESSAGES, OUR_ENUMS = _index(OUR_FILES)


_TYPE_NAMES = {
    getattr(FieldDescriptor, f"TYPE_{name.upper()}"): name
    for name in (
        "double", "float", "int64", "uint64", "int32", "fixed64", "fixed32", "bool", "string", "group",
        "message", "bytes", "uint32", "enum", "sfixed32", "sfixed64", "sint32", "sint64",
    )
}


def _signature(field) -> dict:
    """What decides how a field is encoded and decoded, plus its oneof and presence."""
    referenced = field.message_type or field.enum_type
    return {
        "number": field.number,
        "type": _TYPE_NAMES[field.type],
        "repeated": field.is_repeated,
        "required": field.is_required,
        "type_name": referenced.full_name if referenced else None,
        "oneof": field.containing_oneof.name if field.containing_oneof else None,
        "has_presence": field.has_presence,
    }


def _describe(field) -> str:
    """A field's type as written in a .proto file: "uint64", "repeated inference.X", "map<string, inference.X>"."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        entry = field.message_type.fields_by_name
        return f"map<{_describe(entry['key'])}, {_describe(entry['value'])}>"
    referenced = field.message_type or field.enum_type
    base = referenced.full_name if referenced is not None else _TYPE_NAMES[field.type]
    return f"repeated {base}" if field.is_repeated else base


def _reachable(triton_files):
    """Triton's messages and enums reachable from the service's RPCs, by full name."""
    service = triton_files[1].services_by_name["GRPCInferenceService"]
    queue = collections.deque(m for method in service.methods for m in (method.input_type, method.output_type))
    messages, enums = {}, {}
    while queue:
        message = queue.popleft()
        if message.full_name in messages:
            continue
        messages[message.full_name] = message
        for field in message.fields:
            if field.message_type:
                queue.append(field.message_type)
            if field.enum_type:
                enums[field.enum_type.full_name] = field.enum_type
    return messages, enums


# --- descriptor tests ---------------------------------------------------------


def test_triton_reference_is_what_we_expect(triton_files):
    assert [f.name for f in triton_files] == ["model_config.proto", "grpc_service.proto"]
    assert all(f.package == "inference" for f in triton_files)
    assert len(triton_files[1].services_by_name["GRPCInferenceService"].methods) == 20


def test_service_has_the_same_20_rpcs(triton_files):
    def methods(service):
        return {
            m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
            for m in service.methods
        }

    theirs = methods(triton_files[1].services_by_name["GRPCInferenceService"])
    ours = methods(grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"])
    assert grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name == SERVICE
    assert len(theirs) == 20
    assert ours == theirs


def test_shared_messages_have_identical_fields(triton_files):
    theirs, _ = _index(triton_files)
    shared = sorted(theirs.keys() & OUR_MESSAGES.keys())
    assert len(shared) > 50, "descriptor walk found suspiciously few shared messages"
    problems = []
    for name in shared:
        their_msg, our_msg = theirs[name], OUR_MESSAGES[name]
        for field in their_msg.fields:
            ours = our_msg.fields_by_name.get(field.name)
            if ours is not None and _signature(ours) != _signature(field):
                problems.append(f"{field.full_name}: ours {_signature(ours)} != Triton's {_signature(field)}")
            clash = our_msg.fields_by_number.get(field.number)
            if clash is not None and clash.name != field.name:
                problems.append(f"{name} field {field.number}: ours is {clash.name!r}, Triton's is {field.name!r}")
        if their_msg.GetOptions().map_entry != our_msg.GetOptions().map_entry:
            problems.append(f"{name}: map entry in one protocol only")
    assert not problems, "\n".join(problems)


def test_shared_enums_have_identical_values(triton_files):
    _, theirs = _index(triton_files)
    shared = sorted(theirs.keys() & OUR_ENUMS.keys())
    assert "inference.DataType" in shared
    problems = []
    for name in shared:
        our_values = {v.name: v.number for v in OUR_ENUMS[name].values}
        our_names = {v.number: v.name for v in OUR_ENUMS[name].values}
        for value in theirs[name].values:
            if value.name in our_values and our_values[value.name] != value.number:
                problems.append(f"{name}.{value.name}: ours = {our_values[value.name]}, Triton's = {value.number}")
            if value.number in our_names and our_names[value.number] != value.name:
                problems.append(f"{name} = {value.number}: ours is {our_names[value.number]}, Triton's is {value.name}")
    assert not problems, "\n".join(problems)


def test_everything_reachable_from_the_rpcs_exists(triton_files):
    messages, enums = _reachable(triton_files)
    assert "inference.ModelConfig" in messages and "inference.DataType" in enums
    missing = []
    for name, message in sorted(messages.items()):
        ours = OUR_MESSAGES.get(name)
        if ours is None:
            missing.append(f"message {name}")
            continue
        missing += [
            f"field {f.full_name} = {f.number}"
            for f in message.fields
            if f.name not in ours.fields_by_name and f.full_name not in INTENTIONALLY_MISSING
        ]
        missing += [f"oneof {name}.{o.name}" for o in message.oneofs if o.name not in ours.oneofs_by_name]
    for name, enum in sorted(enums.items()):
        ours = OUR_ENUMS.get(name)
        if ours is None:
            missing.append(f"enum {name}")
            continue
        missing += [f"enum value {name}.{v.name} = {v.number}" for v in enum.values if v.name not in ours.values_by_name]
    assert not missing, "missing from ours:\n" + "\n".join(missing)


def test_every_triton_message_and_enum_exists(triton_files):
    """Also those no RPC reaches: same full names, so a config or client using them works."""
    messages, enums = _index(triton_files)
    missing = sorted(messages.keys() - OUR_MESSAGES.keys()) + sorted(enums.keys() - OUR_ENUMS.keys())
    assert not missing, "missing from ours:\n" + "\n".join(missing)


def test_fields_newer_than_the_reference_are_pinned(triton_files):
    theirs, their_enums = _index(triton_files)
    unpinned, wrong = [], []
    for name, message in sorted(OUR_MESSAGES.items()):
        if message.GetOptions().map_entry:
            continue  # described by its map field
        reference = theirs.get(name)
        for field in message.fields:
            if reference is not None and field.name in reference.fields_by_name:
                continue
            actual = (field.number, _describe(field))
            pinned = NEWER_THAN_REFERENCE.get(field.full_name)
            if pinned is None:
                unpinned.append(f"{field.full_name} = {actual}")
            elif pinned != actual:
                wrong.append(f"{field.full_name}: ours {actual}, Triton's published {pinned}")
    for name, enum in sorted(OUR_ENUMS.items()):
        reference = their_enums.get(name)
        unpinned += [
            f"{name}.{v.name} = {v.number}"
            for v in enum.values
            if reference is None or v.name not in reference.values_by_name
        ]
    assert not unpinned, "not in the installed tritonclient's protos, nor pinned:\n" + "\n".join(unpinned)
    assert not wrong, "\n".join(wrong)
    for full_name, pinned in NEWER_THAN_REFERENCE.items():
        message_name, _, field_name = full_name.rpartition(".")
        ours = OUR_MESSAGES[message_name].fields_by_name.get(field_name)
        assert ours is not None, f"{full_name}: pinned but not defined by us"
        reference = theirs.get(message_name)
        if reference is not None and field_name in reference.fields_by_name:
            field = reference.fields_by_name[field_name]
            assert (field.number, _describe(field)) == pinned, f"{full_name}: pin disagrees with tritonclient"


def test_allow_list_names_real_dropped_model_config_fields(triton_files):
    theirs, _ = _index([triton_files[0]])
    for full_name, reason in INTENTIONALLY_MISSING.items():
        message_name, _, field_name = full_name.rpartition(".")
        assert reason, full_name
        assert message_name in theirs, f"{full_name}: not a model_config.proto message in Triton's"
        field = theirs[message_name].fields_by_name.get(field_name)
        assert field is not None, f"{full_name}: Triton has no such field; drop it from the allow-list"
        ours = OUR_MESSAGES[message_name]
        assert field_name not in ours.fields_by_name, f"{full_name}: we define it; drop it from the allow-list"
        assert field.number not in ours.fields_by_number, f"{full_name}: we reuse its number {field.number}"


# --- round trips --------------------------------------------------------------


def _decode(encoded: str) -> bytes:
    return base64.b64decode(encoded)


@pytest.mark.parametrize("key", list(_BUILDERS))
def test_triton_built_message_parses_with_ours(triton, key):
    built = triton["built"][key]
    assert "error" not in built, built.get("error")
    ours = _our_message(key)
    assert built["type"] == ours.DESCRIPTOR.full_name
    parsed = type(ours).FromString(_decode(built["wire"]))
    assert _unknown_free(parsed), "our classes saw fields they do not know"
    assert json_format.MessageToDict(parsed, preserving_proto_field_name=True) == built["dict"]
    assert parsed == ours
    assert parsed.SerializeToString(deterministic=True) == _decode(built["wire"])


@pytest.mark.parametrize("key", list(_BUILDERS))
def test_our_message_parses_with_triton(triton, key):
    ours = _our_message(key)
    assert "error" not in triton["built"][key], triton["built"][key].get("error")
    parsed = triton["parsed"][key]
    assert parsed["unknown_free"], "tritonclient's classes saw fields they do not know"
    assert parsed["dict"] == json_format.MessageToDict(ours, preserving_proto_field_name=True)
    assert parsed["equals_built"], "tritonclient parsed our bytes into something other than its own build"
    assert _decode(parsed["wire"]) == ours.SerializeToString(deterministic=True)


def test_infer_request_values_survive_the_trip_from_triton(triton):
    """Spot checks that do not rely on the comparisons above."""
    req = grpc_service_pb2.ModelInferRequest.FromString(_decode(triton["built"]["ModelInferRequest"]["wire"]))
    assert (req.model_name, req.model_version, req.id) == ("mlp_onnx", "3", "req-42")
    assert req.parameters["priority"].WhichOneof("parameter_choice") == "uint64_param"
    assert req.parameters["priority"].uint64_param == 2**64 - 2
    assert req.parameters["sequence_id"].int64_param == -7
    assert req.parameters["tenant"].string_param == "équipe-α"
    assert [i.name for i in req.inputs] == ["INPUT0", "INPUT1", "INPUT2"]
    assert list(req.inputs[0].shape) == [2, 3]
    assert req.inputs[0].parameters["binary_data_size"].int64_param == 24
    assert list(req.inputs[1].contents.int64_contents) == [-(2**63), -1, 0, 2**63 - 1]
    assert list(req.inputs[1].contents.uint64_contents) == [2**64 - 1]
    assert list(req.inputs[2].contents.bytes_contents) == [b"\x00\xff\x80", "hé".encode()]
    assert req.outputs[1].parameters["binary_data"].bool_param is True
    assert list(req.raw_input_contents) == [bytes(range(24)), b""]


# --- generated code -----------------------------------------------------------


def test_generated_code_is_up_to_date():
    proc = subprocess.run(
        [sys.executable, "-m", "meshserve.protos.generate", "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
