"""Sizes as people write them, shared by the deployment spec and the node agent's flags.

``40GiB``, ``512MiB``, ``1.5GB``, ``1024`` (bytes): binary units (KiB,
MiB, GiB, TiB, also Ki/Mi/Gi/Ti) and decimal ones (KB, MB, GB, TB). A bare
``40G`` is refused as ambiguous. Fractions round up to a whole byte.
"""

from __future__ import annotations

import json
import re
from decimal import ROUND_CEILING, Decimal, InvalidOperation

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]*)\s*$")
_BINARY = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
           "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_DECIMAL = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_CANONICAL_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10),
                    ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))
HINT = "use e.g. 40GiB, 512MiB"


def _show(value) -> str:
    """A value as it was written in YAML or on a command line, for messages."""
    if isinstance(value, (str, bool)) or value is None:
        return json.dumps(value)
    return str(value)


def parse_size(value: int | str) -> int:
    """Bytes for a size; raises ValueError with a message that quotes the value."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{_show(value)} is not a size ({HINT})")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative (a size is 0 or more)")
        return value
    match = _SIZE.match(value)
    if not match:
        if value.strip().startswith("-"):
            raise ValueError(f"{_show(value)} is negative (a size is 0 or more)")
        raise ValueError(f"{_show(value)} is not a size ({HINT})")
    number, unit = match.group(1), match.group(2).lower()
    if unit in ("k", "m", "g", "t"):
        big = unit.upper()
        raise ValueError(f"{_show(value)} is ambiguous: write {number}{big}iB (powers of 2) "
                         f"or {number}{big}B (powers of 10)")
    scale = 1 if unit == "" else _BINARY.get(unit) or _DECIMAL.get(unit)
    if scale is None:
        raise ValueError(f"{_show(value)} is not a size ({HINT})")
    try:
        amount = Decimal(number) * scale
    except InvalidOperation:
        raise ValueError(f"{_show(value)} is not a size ({HINT})") from None
    return int(amount.to_integral_value(rounding=ROUND_CEILING))


def format_size(size: int) -> str | int:
    """The exact canonical form of a size: the largest unit that divides it, else bytes (an int)."""
    if size == 0:
        return 0
    for unit, scale in _CANONICAL_UNITS:
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return size
