"""gRPC failures -> the mesh's error taxonomy, on the client side.

A failed call raises the same type the server raised (``InvalidArgument``,
``NotFound``...), carrying the server's message unchanged; the original
``grpc.RpcError`` is kept as ``__cause__`` by the callers (``raise ... from``).
"""

from __future__ import annotations

import re

import grpc

from meshserve.common.errors import Internal, MeshError, error_for_status

_CODES_BY_NAME: dict[str, grpc.StatusCode] = {code.name: code for code in grpc.StatusCode}
_CODES_BY_CLASS: dict[str, grpc.StatusCode] = {
    cls.__name__: cls.code for cls in MeshError.__subclasses__()
}
# A stream error names its status at the start of the message, as
# "INVALID_ARGUMENT: ...", "[StatusCode.NOT_FOUND] ..." or "InvalidArgument: ...".
_LEADING_CODE = re.compile(r"^\s*\[?\s*(?:StatusCode\.)?([A-Za-z_]+)\s*[\]:]")


def from_rpc_error(error: grpc.RpcError) -> MeshError:
    """The taxonomy error for a failed call, with the server's message."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = error.details() if callable(getattr(error, "details", None)) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return error_for_status(code, details or code.name)


def from_stream_error(message: str) -> MeshError:
    """The taxonomy error for a ``ModelStreamInferResponse.error_message``.

    A stream reports a per-request failure as text, not as a status. When the
    message starts with a status code name or a taxonomy type name, that type
    is used; otherwise the error is ``Internal``. The message is kept whole.
    """
    match = _LEADING_CODE.match(message)
    if match:
        word = match.group(1)
        code = _CODES_BY_NAME.get(word.upper()) or _CODES_BY_CLASS.get(word)
        if code is not None and code is not grpc.StatusCode.OK:
            return error_for_status(code, message)
    return Internal(message)
