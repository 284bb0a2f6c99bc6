"""Tensor wire conventions of the KServe v2 protocol, for numpy.

Shared by the runtime and the client library so both sides agree on every
byte: datatype names, element sizes, row-major raw buffers without padding,
BYTES elements as a 4-byte little-endian length followed by the bytes, and
the typed ``InferTensorContents`` field each datatype uses. Functions raise
``ValueError`` with a message naming the problem; callers add the tensor
name and turn it into ``InvalidArgument``.
"""

from __future__ import annotations

import struct

import ml_dtypes
import numpy as np

# Datatype name -> numpy dtype. BYTES is an object array of ``bytes``.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "BYTES": np.dtype(np.object_),
}

# Datatype name -> field of InferTensorContents; FP16 and BF16 travel raw only.
CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_CONTENTS_FIELD_NAMES = tuple(dict.fromkeys(CONTENTS_FIELDS.values()))

# Config enum names (TYPE_FP32, TYPE_STRING, ...) <-> protocol datatype names.
CONFIG_TO_DATATYPE: dict[str, str] = {f"TYPE_{name}": name for name in NUMPY_DTYPES if name != "BYTES"}
CONFIG_TO_DATATYPE["TYPE_STRING"] = "BYTES"
DATATYPE_TO_CONFIG: dict[str, str] = {v: k for k, v in CONFIG_TO_DATATYPE.items()}

_LENGTH = struct.Struct("<I")


def datatype_of(array: np.ndarray) -> str:
    """The protocol datatype of a numpy array (str/bytes/object arrays are BYTES)."""
    kind = array.dtype
    if kind.kind in ("O", "S", "U"):
        return "BYTES"
    for name, dtype in NUMPY_DTYPES.items():
        if dtype == kind:
            return name
    raise ValueError(f"numpy dtype {kind} has no KServe v2 datatype")


def element_count(shape) -> int:
    count = 1
    for dim in shape:
        if dim < 0:
            raise ValueError(f"shape {list(shape)} has a negative dimension")
        count *= dim
    return count


def element_bytes(item) -> bytes:
    """One BYTES element: bytes as they are, str as UTF-8; anything else is refused."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    raise ValueError(f"a BYTES element must be bytes or str, not {type(item).__name__} ({item!r:.40})")


def encode_bytes(array: np.ndarray) -> bytes:
    """Serialize a BYTES tensor: each element as length-prefixed bytes, row-major."""
    parts = []
    for item in array.ravel(order="C"):
        data = element_bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_bytes(buffer: bytes, shape) -> np.ndarray:
    """Parse length-prefixed BYTES elements into an object array of ``shape``.

    Raises ValueError if the buffer holds more or fewer elements than the
    shape says, or an element's length runs past the end of the buffer.
    """
    count = element_count(shape)
    items = []
    view = memoryview(buffer)
    offset = 0
    end = len(view)
    while offset < end:
        if offset + 4 > end:
            raise ValueError(f"BYTES element {len(items)} has a truncated 4-byte length prefix")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise ValueError(
                f"BYTES element {len(items)} declares {length} bytes but only {end - offset} remain"
            )
        items.append(bytes(view[offset:offset + length]))
        offset += length
    if len(items) != count:
        raise ValueError(f"BYTES data holds {len(items)} elements but shape {list(shape)} needs {count}")
    array = np.empty(count, dtype=np.object_)
    array[:] = items
    return array.reshape(shape)


def from_raw(datatype: str, shape, buffer: bytes) -> np.ndarray:
    """Decode one raw tensor buffer; the byte size must match shape and datatype exactly."""
    if datatype == "BYTES":
        return decode_bytes(buffer, shape)
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise ValueError(f"unknown datatype {datatype!r}")
    expected = element_count(shape) * dtype.itemsize
    if len(buffer) != expected:
        raise ValueError(
            f"raw data is {len(buffer)} bytes but shape {list(shape)} of {datatype} needs {expected}"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def to_raw(array: np.ndarray, datatype: str | None = None) -> bytes:
    """Encode an array as the raw buffer of its (or the given) datatype."""
    datatype = datatype or datatype_of(array)
    if datatype == "BYTES":
        return encode_bytes(array)
    dtype = NUMPY_DTYPES[datatype]
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def from_contents(datatype: str, shape, contents) -> np.ndarray:
    """Decode a tensor sent in the typed ``contents`` fields of InferTensorContents."""
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        if datatype in NUMPY_DTYPES:
            raise ValueError(f"{datatype} has no typed contents field; send it in raw_input_contents")
        raise ValueError(f"unknown datatype {datatype!r}")
    others = [name for name in _CONTENTS_FIELD_NAMES if name != field and len(getattr(contents, name))]
    if others:
        raise ValueError(
            f"has {', '.join(others)} as well as {field}; a {datatype} tensor sends its values in {field} only"
        )
    values = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise ValueError(f"contents hold {len(values)} elements but shape {list(shape)} needs {count}")
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return array.reshape(shape)
    dtype = NUMPY_DTYPES[datatype]
    if dtype.kind in "iu" and count:
        # int_contents/uint_contents are 32-bit: narrower types must not wrap silently.
        limits = np.iinfo(dtype)
        low, high = min(values), max(values)
        if low < limits.min or high > limits.max:
            bad = low if low < limits.min else high
            raise ValueError(f"value {bad} is out of range for {datatype} ({limits.min}..{limits.max})")
    return np.asarray(values, dtype=dtype).reshape(shape)


def fill_contents(contents, array: np.ndarray, datatype: str) -> None:
    """Write ``array`` into the typed field of an InferTensorContents message."""
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise ValueError(f"{datatype} has no typed contents field; use raw contents")
    flat = array.ravel(order="C")
    if datatype == "BYTES":
        getattr(contents, field).extend(element_bytes(item) for item in flat)
    else:
        getattr(contents, field).extend(flat.tolist())
