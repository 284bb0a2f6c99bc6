"""A tiny protobuf wire scanner: the model a request names, read without decoding it.

``ModelInferRequest`` and the model-scoped requests (``ModelMetadata``,
``ModelConfig``, ``ModelReady``, ``ModelStatistics``) all carry the model's
name in field 1 and its version in field 2, both strings. The proxy needs
only those two to route, so it walks the top-level fields of the raw
request: a length-delimited field (the tensors, ``raw_input_contents``) is
skipped by its length without being read, so the cost grows with the
number of top-level fields, not with the size of the tensors.

Guarantees:
- The result is what a full parse would give for fields 1 and 2 (the last
  occurrence wins, as in protobuf), or ``InvalidArgument`` naming the
  defect: a truncated or over-long varint, a length past the end, a
  reserved field number, a group or unknown wire type, field 1 or 2 that is
  not a valid UTF-8 string.
- Nothing else is checked; the replica parses the whole message and
  answers for the rest.
"""

from __future__ import annotations

from typing import NamedTuple

from meshserve.common.errors import InvalidArgument

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_VARINT_BYTES = 10
_NAME_FIELD, _VERSION_FIELD, _ID_FIELD = 1, 2, 3
# ModelInferRequest.inputs and .outputs: their parameters are where a tensor names a shared memory region.
_TENSOR_FIELDS = (5, 6)
_SHM_KEY = b"shared_memory_region"  # runtime.shared_memory.REGION_PARAMETER
# Up to this size one search of the whole request (C speed, under a microsecond) rules the key out
# before any field is walked in Python (~15 µs); above it the walk is cheaper than the search.
_WHOLE_SEARCH_BYTES = 8192
_STRING_FIELDS = {_NAME_FIELD: "the model name", _VERSION_FIELD: "the model version", _ID_FIELD: "the request id"}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    result = shift = 0
    end = min(len(data), pos + _MAX_VARINT_BYTES)
    while pos < end:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    if pos >= len(data):
        raise InvalidArgument("malformed request: truncated varint")
    raise InvalidArgument("malformed request: varint longer than 10 bytes")


def _string(data: bytes, start: int, end: int, what: str) -> str:
    try:
        return data[start:end].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"malformed request: {what} is not valid UTF-8") from None


class RequestHead(NamedTuple):
    """Fields 1-3 of a request: for ``ModelInferRequest`` model_name, model_version and id."""

    model: str
    version: str
    id: str


def scan_request(data: bytes, with_id: bool = False) -> RequestHead:
    """The model name and version of a serialized request (empty strings when absent).

    ``with_id`` also reads field 3 as a string (``ModelInferRequest.id``); the
    other model-scoped requests have no field 3.
    """
    found = {_NAME_FIELD: "", _VERSION_FIELD: "", _ID_FIELD: ""}
    strings = (_NAME_FIELD, _VERSION_FIELD, _ID_FIELD) if with_id else (_NAME_FIELD, _VERSION_FIELD)
    pos, size = 0, len(data)
    while pos < size:
        key, pos = _varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise InvalidArgument("malformed request: field number 0")
        if wire_type == _VARINT:
            _, pos = _varint(data, pos)
        elif wire_type == _I64:
            pos += 8
        elif wire_type == _I32:
            pos += 4
        elif wire_type == _LEN:
            length, pos = _varint(data, pos)
            start, pos = pos, pos + length
            if pos <= size and field in strings:
                found[field] = _string(data, start, pos, _STRING_FIELDS[field])
        else:
            raise InvalidArgument(f"malformed request: wire type {wire_type} in field {field}")
        if pos > size:
            raise InvalidArgument(f"malformed request: field {field} runs past the end of the message")
        if field in strings and wire_type != _LEN:
            raise InvalidArgument(f"malformed request: field {field} ({_STRING_FIELDS[field]}) is not a string")
    return RequestHead(found[_NAME_FIELD], found[_VERSION_FIELD], found[_ID_FIELD])


def may_name_shared_memory(data: bytes) -> bool:
    """Whether an input or output of a ``ModelInferRequest`` (fields 5, 6) contains the bytes of the
    ``shared_memory_region`` parameter key. Only those small messages are searched, never the
    tensor bytes (field 7); True may be a tensor merely named so: parse to be sure. Call it after
    ``scan_request`` accepted ``data`` (a malformed message answers False here)."""
    size = len(data)
    if size <= _WHOLE_SEARCH_BYTES:
        return _SHM_KEY in data and _key_in_tensors(data)
    return _key_in_tensors(data)


def _key_in_tensors(data: bytes) -> bool:
    pos, size = 0, len(data)
    try:
        while pos < size:
            key, pos = _varint(data, pos)
            field, wire_type = key >> 3, key & 7
            if wire_type == _LEN:
                length, pos = _varint(data, pos)
                start, pos = pos, pos + length
                if field in _TENSOR_FIELDS and data.find(_SHM_KEY, start, min(pos, size)) >= 0:
                    return True
            elif wire_type == _VARINT:
                _, pos = _varint(data, pos)
            elif wire_type == _I64:
                pos += 8
            elif wire_type == _I32:
                pos += 4
            else:
                return False
    except InvalidArgument:
        return False
    return False
