"""What a model name may be: a plain name, never a path.

A model name becomes a folder name under the repository root
(``<root>/<name>/config.pbtxt``), so every name from a client is checked
here before it is used anywhere: one definition for every RPC.
"""

from __future__ import annotations

from meshserve.common.errors import InvalidArgument

# A model name is one path component: Linux's NAME_MAX (255 bytes) bounds what could be a folder.
MAX_MODEL_NAME_BYTES = 255
_FORBIDDEN = {"/": "a path separator '/'", "\\": "a path separator '\\'", "\0": "a NUL character"}


def plain_model_name(name: str) -> str:
    """``name`` unchanged if it is a plain model name; else ``InvalidArgument`` saying why.

    Refused: empty, longer than 255 bytes, containing ``/``, ``\\`` or NUL,
    or starting with ``.`` (``.``, ``..`` and hidden folders).
    """
    if not name:
        raise InvalidArgument("a model name is required")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_MODEL_NAME_BYTES:
        raise InvalidArgument(f"model name of {size} bytes is too long (at most {MAX_MODEL_NAME_BYTES})")
    for char, what in _FORBIDDEN.items():
        if char in name:
            raise InvalidArgument(f"invalid model name {_shown(name)}: it contains {what}")
    if name.startswith("."):
        raise InvalidArgument(f"invalid model name {_shown(name)}: it starts with '.'")
    return name


def _shown(name: str) -> str:
    """The name quoted for a message, control characters escaped, cut to stay one short line."""
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."
