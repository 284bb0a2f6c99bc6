"""Tensor wire conventions of the KServe v2 protocol, for numpy.

Shared by the runtime and the client library so both sides agree on every
byte: datatype names, element sizes, row-major raw buffers without padding,
BYTES elements as a 4-byte little-endian length followed by the bytes, and
the typed ``InferTensorContents`` field each datatype uses. Functions raise
``ValueError`` with a message naming the problem; callers add the tensor
name and turn it into ``InvalidArgument``.
"""

from __future__ import annotations

import array
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
# The most elements one BYTES tensor of a request may have. Each becomes a
# pointer in the model's object array (and an object unless empty), and a
# buffer of mixed lengths is walked element by element on the event loop
# (0.3-0.6 us each on a loaded 2-core machine): 4 Mi elements keep the worst
# request near 2 s and a few hundred MB, far beyond real batches of strings,
# where a 256 MB message could otherwise carry 64 Mi empty elements.
MAX_BYTES_ELEMENTS = 1 << 22
# Elements a BYTES encode or decode handles per step: its index arrays (~50 bytes
# per element) stay near 3 MB whatever the size of the tensor, and a step's
# fixed cost (tens of microseconds) is small against its elements' work.
_CHUNK_ELEMENTS = 1 << 16
# Surplus elements counted past the shape's count to say how many a buffer
# holds; beyond that the message says "more than", without walking the rest.
_SURPLUS_COUNTED = 1 << 10


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


def check_bytes_elements(shape) -> None:
    """Refuse a BYTES tensor of more than ``MAX_BYTES_ELEMENTS`` elements, before decoding it."""
    count = element_count(shape)
    if count > MAX_BYTES_ELEMENTS:
        raise ValueError(f"a BYTES tensor of {count} elements is refused; at most {MAX_BYTES_ELEMENTS} are accepted")


def _bytes_items(elements: np.ndarray) -> list[bytes]:
    """Some elements of a BYTES tensor as a list of ``bytes``: str as UTF-8, anything else refused."""
    items = elements.tolist()
    if not all(issubclass(kind, bytes) for kind in set(map(type, items))):
        items = list(map(element_bytes, items))
    return items


def encode_bytes(array: np.ndarray) -> bytes:
    """Serialize a BYTES tensor: each element as length-prefixed bytes, row-major.

    Vectorised, chunk by chunk: the lengths are read in one pass, the
    elements joined once and the 4-byte prefixes placed around them with
    numpy; no Python object is made per element. Peak memory is about twice
    the encoded size plus about 15 MB for one chunk.
    """
    flat = np.asarray(array).ravel(order="C")
    segments = [_encode_chunk(_bytes_items(flat[first:first + _CHUNK_ELEMENTS]))
                for first in range(0, len(flat), _CHUNK_ELEMENTS)]
    return segments[0] if len(segments) == 1 else b"".join(segments)


def _encode_chunk(items: list[bytes]) -> bytes:
    count = len(items)
    lengths = np.fromiter(map(len, items), dtype=np.int64, count=count)
    longest = int(lengths.max())
    if longest > 0xFFFFFFFF:
        raise ValueError(f"a BYTES element of {longest} bytes does not fit a 4-byte length prefix")
    prefixes = lengths.astype("<u4").view(np.uint8).reshape(count, 4)
    if longest == 0:
        return prefixes.tobytes()
    data = np.frombuffer(b"".join(items), dtype=np.uint8)
    out = np.empty(4 * count + len(data), dtype=np.uint8)
    if int(lengths.min()) == longest:  # all elements alike: one reshape
        rows = out.reshape(count, 4 + longest)
        rows[:, :4] = prefixes
        rows[:, 4:] = data.reshape(count, longest)
        return out.tobytes()
    prefix_at = np.arange(0, 4 * count, 4, dtype=np.int64)
    prefix_at[1:] += np.cumsum(lengths[:-1])
    is_data = np.ones(len(out), dtype=bool)
    for column in range(4):
        out[prefix_at + column] = prefixes[:, column]
        is_data[prefix_at + column] = False
    out[is_data] = data
    return out.tobytes()


def _uniform_width(data: bytes, count: int) -> int | None:
    """The length of every element when all ``count`` have the same one (empty strings,
    fixed-width tokens), checked with numpy; None otherwise."""
    end = len(data)
    if not count or end < 4:
        return None
    (width,) = _LENGTH.unpack_from(data, 0)
    if end != count * (4 + width):
        return None
    rows = np.frombuffer(data, dtype=np.uint8).reshape(count, 4 + width)
    for first in range(0, count, _CHUNK_ELEMENTS):
        if not (np.ascontiguousarray(rows[first:first + _CHUNK_ELEMENTS, :4]).view("<u4") == width).all():
            return None
    return width


def _element_lengths(data: bytes, count: int, shape) -> np.ndarray:
    """The length of each of the ``count`` elements of a BYTES buffer (uint32); ValueError if it
    is not exactly ``count`` well-formed elements."""
    end = len(data)
    # Each prefix says where the next one is: one sequential walk, as lean as Python allows
    # (no bounds checks in the loop: a malformed buffer is diagnosed by _malformed afterwards).
    lengths = array.array("I")
    append = lengths.append
    unpack = _LENGTH.unpack_from
    offset = 0
    try:
        for _ in range(count):
            (length,) = unpack(data, offset)
            append(length)
            offset += 4 + length
    except struct.error:
        offset = end + 1
    if offset != end:
        raise ValueError(_malformed(data, count, shape))
    return np.frombuffer(lengths, dtype=np.uint32)


def _malformed(data: bytes, count: int, shape) -> str:
    """What is wrong with a BYTES buffer that is not exactly ``count`` elements."""
    end = len(data)
    offset = 0
    held = 0
    while offset < end and held < count + _SURPLUS_COUNTED:
        if offset + 4 > end:
            return f"BYTES element {held} has a truncated 4-byte length prefix"
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > end:
            return f"BYTES element {held} declares {length} bytes but only {end - offset} remain"
        offset += length
        held += 1
    holds = f"more than {held}" if offset < end else f"{held}"
    return f"BYTES data holds {holds} elements but shape {list(shape)} needs {count}"


def decode_bytes(buffer: bytes | memoryview, shape) -> np.ndarray:
    """Parse length-prefixed BYTES elements into an object array of ``bytes`` of ``shape``.

    Raises ValueError if the buffer holds more or fewer elements than the
    shape says, or an element's length runs past the end of the buffer.
    Empty elements share the one empty ``bytes`` object; a buffer of
    elements all of one length is checked with numpy; otherwise the length
    prefixes are walked once (each says where the next one is). Memory: the
    result (a pointer per element, an object per non-empty element) and 4
    bytes per element, plus one chunk's index arrays.
    """
    count = element_count(shape)
    data = buffer if isinstance(buffer, bytes) else bytes(buffer)
    result = np.full(count, b"", dtype=object)
    width = _uniform_width(data, count)
    if width == 0:
        return result.reshape(shape)
    if width is not None:
        for first in range(0, count, _CHUNK_ELEMENTS):
            starts = np.arange(first, min(count, first + _CHUNK_ELEMENTS), dtype=np.int64) * (4 + width) + 4
            result[first:first + len(starts)] = list(map(data.__getitem__, map(slice, starts.tolist(),
                                                                                (starts + width).tolist())))
        return result.reshape(shape)
    lengths = _element_lengths(data, count, shape)
    base = 0
    for first in range(0, count, _CHUNK_ELEMENTS):
        chunk = lengths[first:first + _CHUNK_ELEMENTS].astype(np.int64)
        stops = np.cumsum(chunk + 4)
        stops += base
        base = int(stops[-1])
        chosen = np.flatnonzero(chunk)
        if len(chosen):
            ends = stops[chosen]
            starts = ends - chunk[chosen]
            result[first + chosen] = list(map(data.__getitem__, map(slice, starts.tolist(), ends.tolist())))
    return result.reshape(shape)


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
        getattr(contents, field).extend(_bytes_items(flat))
    else:
        getattr(contents, field).extend(flat.tolist())
