"""The BYTES codec of protos/tensors.py: exact bytes, clear errors, and memory bounded by the message.

Memory is measured with tracemalloc (numpy reports its buffers to it), so the
bounds hold whatever else the machine runs: they are multiples of the
message size, not absolute figures.
"""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest

from meshserve.common import tensors

# Elements in the memory tests: 8 MB of empty elements, far above any fixed overhead.
MANY = 2 << 20


def _reference_encoding(items) -> bytes:
    """The wire format spelled out: a 4-byte little-endian length before each element."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _peak_bytes(action) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = action()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("items", [
    [],
    [b""],
    [b""] * 5,
    [b"a"],
    [b"", b"\x00", b"ab\x00", b"\xff\xfe", "ü".encode(), b""],  # trailing NUL, non-UTF-8, empty
    [b"same"] * 4,
    [bytes(range(256)) * 3, b"", b"z"],
])
def test_round_trip_is_exact_and_matches_the_wire_format(items):
    array = np.empty(len(items), dtype=object)
    array[:] = items
    encoded = tensors.encode_bytes(array)
    assert encoded == _reference_encoding(items)
    decoded = tensors.decode_bytes(encoded, [len(items)])
    assert decoded.dtype == object and decoded.shape == (len(items),)
    assert all(type(item) is bytes for item in decoded)
    assert decoded.tolist() == items


def test_elements_across_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(tensors, "_CHUNK_ELEMENTS", 3)  # exercise the chunking with a few elements
    items = [b"x" * (index % 4) for index in range(11)]
    array = np.array(items + [b""], dtype=object)[:-1]
    encoded = tensors.encode_bytes(array)
    assert encoded == _reference_encoding(items)
    assert tensors.decode_bytes(encoded, [11]).tolist() == items
    assert tensors.decode_bytes(tensors.encode_bytes(np.full(7, b"ab", dtype=object)), [7]).tolist() == [b"ab"] * 7


def test_shapes_str_and_fixed_width_arrays():
    words = np.array([["ab", "ü"], ["", "xyz"]])  # a U array: UTF-8 encoded
    encoded = tensors.encode_bytes(words)
    decoded = tensors.decode_bytes(encoded, [2, 2])
    assert decoded.tolist() == [[b"ab", "ü".encode()], [b"", b"xyz"]]
    assert tensors.encode_bytes(np.array([b"ab", b"c"])) == _reference_encoding([b"ab", b"c"])  # S array
    mixed = np.array([b"ab", "cd"], dtype=object)
    assert tensors.encode_bytes(mixed) == _reference_encoding([b"ab", b"cd"])
    assert tensors.decode_bytes(memoryview(encoded), [4]).tolist() == [b"ab", "ü".encode(), b"", b"xyz"]


def test_an_element_that_is_not_bytes_or_str_is_refused():
    with pytest.raises(ValueError, match="must be bytes or str, not int"):
        tensors.encode_bytes(np.array([b"ok", 7], dtype=object))


@pytest.mark.parametrize("buffer, shape, message", [
    (struct.pack("<I", 2) + b"ok" + b"\x05\x00", [2], "element 1 has a truncated 4-byte length prefix"),
    (b"\x01\x00", [1], "element 0 has a truncated 4-byte length prefix"),
    (struct.pack("<I", 10) + b"short", [1], "element 0 declares 10 bytes but only 5 remain"),
    (struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b", [3], "holds 2 elements but shape [3] needs 3"),
    (struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b", [1], "holds 2 elements but shape [1] needs 1"),
    (bytes(4 * 5000), [2], "holds more than 1026 elements but shape [2] needs 2"),
    (b"", [1], "holds 0 elements but shape [1] needs 1"),
    (bytes(4), [0], "holds 1 elements but shape [0] needs 0"),
    (bytes(4 * 3) + struct.pack("<I", 9), [4], "element 3 declares 9 bytes but only 0 remain"),
])
def test_malformed_buffers_name_the_problem(buffer, shape, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tensors.decode_bytes(buffer, shape)


def test_a_request_may_not_create_more_bytes_elements_than_the_limit():
    tensors.check_bytes_elements([tensors.MAX_BYTES_ELEMENTS])
    with pytest.raises(ValueError, match=f"at most {tensors.MAX_BYTES_ELEMENTS}"):
        tensors.check_bytes_elements([2, tensors.MAX_BYTES_ELEMENTS])


def test_decoding_many_empty_elements_stays_within_3x_the_message():
    """A pointer per element (the object array the model gets) and 4 bytes of lengths: 3x of 4 bytes each."""
    message = bytes(4 * MANY)
    decoded, peak = _peak_bytes(lambda: tensors.decode_bytes(message, [MANY]))
    assert len(decoded) == MANY and decoded[0] == b"" and decoded[-1] == b""
    assert peak <= 3 * len(message), f"peak {peak / 2**20:.1f} MiB for a {len(message) / 2**20:.0f} MiB message"


def test_encoding_many_empty_elements_stays_within_3x_the_output():
    """The old encoder made a 4-byte bytes object and two list entries per element (13x)."""
    array = np.full(MANY, b"", dtype=object)
    encoded, peak = _peak_bytes(lambda: tensors.encode_bytes(array))
    assert len(encoded) == 4 * MANY
    assert peak <= 3 * len(encoded), f"peak {peak / 2**20:.1f} MiB for a {len(encoded) / 2**20:.0f} MiB output"


def test_encoding_mixed_lengths_stays_within_3x_the_output():
    array = np.empty(MANY, dtype=object)
    array[:] = [b"x" * (index % 7) for index in range(len(array))]
    encoded, peak = _peak_bytes(lambda: tensors.encode_bytes(array))
    assert peak <= 3 * len(encoded), f"peak {peak / 2**20:.1f} MiB for a {len(encoded) / 2**20:.0f} MiB output"
