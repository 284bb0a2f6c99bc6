"""Inference requests from numpy, and numpy from inference responses.

Shared by the sync and asyncio clients; no transport here. The byte-level
conventions (datatype names, raw layout, BYTES length prefixes, typed
contents fields) are ``protos.tensors``'; this module only arranges them into
messages:

* Requests carry one ``raw_input_contents`` buffer per input, in input
  order, unless ``use_raw=False``, which fills the typed ``contents`` instead
  (FP16 and BF16 have no typed field and must go raw).
* str arrays travel as BYTES, utf-8 encoded.
* Responses are decoded from ``raw_output_contents`` or from typed
  ``contents``, whichever the server used. Numeric outputs decoded from raw
  buffers are read-only views over the response (no copy); BYTES outputs are
  object arrays of ``bytes``.

Bad input raises ``InvalidArgument`` naming the tensor, before anything is
sent; a response that breaks the wire conventions raises ``Internal``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from google.protobuf.internal.containers import MessageMap

from meshserve.common import tensors
from meshserve.common.errors import Internal, InvalidArgument
from meshserve.protos.inference import grpc_service_pb2 as pb

from .status import from_stream_error

# Decoupled responses: the server marks the last response of a request with
# this parameter; asking for an empty final response lets a stream end even
# when the model's last real response was sent before it knew it was last.
FINAL_RESPONSE = "triton_final_response"
ENABLE_EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"

_INT64_MAX = 2**63 - 1


def set_parameter(parameter: pb.InferParameter, value: object) -> None:
    """Store a Python bool, int, float or str in an ``InferParameter``."""
    if isinstance(value, (bool, np.bool_)):
        parameter.bool_param = bool(value)
    elif isinstance(value, (int, np.integer)):
        if value > _INT64_MAX:
            parameter.uint64_param = int(value)
        else:
            parameter.int64_param = int(value)
    elif isinstance(value, (float, np.floating)):
        parameter.double_param = float(value)
    elif isinstance(value, str):
        parameter.string_param = value
    else:
        raise InvalidArgument(
            f"parameter value {value!r} is a {type(value).__name__}; use bool, int, float or str"
        )


def parameter_value(parameter: pb.InferParameter) -> bool | int | float | str | None:
    """The Python value of an ``InferParameter`` (None when unset)."""
    which = parameter.WhichOneof("parameter_choice")
    if which is None:
        return None
    value: bool | int | float | str = getattr(parameter, which)
    return value


def _set_parameters(target: MessageMap[str, pb.InferParameter], parameters: Mapping[str, object] | None) -> None:
    for key, value in (parameters or {}).items():
        try:
            set_parameter(target[key], value)
        except InvalidArgument as err:
            raise InvalidArgument(f"parameter {key!r}: {err.message}") from None


def _as_array(name: str, value: object) -> tuple[np.ndarray, str]:
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    try:
        return array, tensors.datatype_of(array)
    except ValueError as err:
        raise InvalidArgument(f"input {name!r}: {err}") from None


def build_infer_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    *,
    version: str | None = None,
    request_id: str | None = None,
    parameters: Mapping[str, object] | None = None,
    use_raw: bool = True,
) -> pb.ModelInferRequest:
    """A ``ModelInferRequest`` for ``inputs`` (name -> array), in their order.

    ``outputs`` lists the outputs to return; None asks for all of them.
    """
    if isinstance(outputs, str):
        raise InvalidArgument("outputs must be a list of output names, not a str")
    request = pb.ModelInferRequest(model_name=model, model_version=version or "", id=request_id or "")
    _set_parameters(request.parameters, parameters)
    for name, value in inputs.items():
        array, datatype = _as_array(name, value)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        try:
            if use_raw:
                request.raw_input_contents.append(tensors.to_raw(array, datatype))
            else:
                tensors.fill_contents(tensor.contents, array, datatype)
        except (ValueError, TypeError, UnicodeError) as err:
            raise InvalidArgument(f"input {name!r}: {err}") from None
    for name in outputs or ():
        request.outputs.add(name=name)
    return request


def decode_infer_response(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Output name -> array, from raw buffers or typed contents, in response order."""
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise Internal(
            f"response has {len(raw)} raw_output_contents for {len(response.outputs)} outputs"
        )
    result: dict[str, np.ndarray] = {}
    for index, output in enumerate(response.outputs):
        try:
            if raw:
                array = tensors.from_raw(output.datatype, output.shape, raw[index])
            else:
                array = tensors.from_contents(output.datatype, output.shape, output.contents)
        except ValueError as err:
            raise Internal(f"output {output.name!r} of model {response.model_name!r}: {err}") from None
        result[output.name] = array
    return result


def is_final_response(response: pb.ModelInferResponse) -> bool:
    """True if the server marked this response as the last one for its request."""
    parameters = response.parameters
    return FINAL_RESPONSE in parameters and parameter_value(parameters[FINAL_RESPONSE]) is True


def build_stream_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    *,
    version: str | None = None,
    request_id: str | None = None,
    parameters: Mapping[str, object] | None = None,
    use_raw: bool = True,
) -> pb.ModelInferRequest:
    """Like ``build_infer_request``, also asking for an explicit final response.

    A caller's own ``triton_enable_empty_final_response`` parameter wins.
    """
    parameters = {ENABLE_EMPTY_FINAL_RESPONSE: True, **(parameters or {})}
    return build_infer_request(model, inputs, outputs, version=version, request_id=request_id,
                               parameters=parameters, use_raw=use_raw)


def decode_stream_response(message: pb.ModelStreamInferResponse) -> tuple[dict[str, np.ndarray] | None, bool]:
    """``(outputs, final)`` for one stream message.

    ``outputs`` is None for an empty final response (nothing to yield).
    A message with ``error_message`` raises its taxonomy error.
    """
    if message.error_message:
        raise from_stream_error(message.error_message)
    response = message.infer_response
    final = is_final_response(response)
    if final and not response.outputs:
        return None, True
    return decode_infer_response(response), final
