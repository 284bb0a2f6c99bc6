"""One error taxonomy for the whole mesh.

Every error type carries the gRPC status code it travels as. Servers raise
these from domain code and one interceptor-like layer turns them into a
status; the client library maps a status code back to the same type, so
``except InvalidArgument`` works on both sides of the wire.
"""

from __future__ import annotations

import grpc

# A status message travels in the trailers as grpc-message, percent-encoded: up to 3 ASCII bytes
# per UTF-8 byte. A peer refuses trailers over grpc's 8 KiB default metadata limit, and the
# client then sees RESOURCE_EXHAUSTED "metadata size exceeds hard limit" instead of the error.
# 1 KiB of UTF-8 (at most 3 KiB encoded) always fits beside the other trailers, and is far more
# than a message that names a problem needs; only a message echoing hostile input is cut.
MAX_STATUS_MESSAGE_BYTES = 1024
_CUT = "…"


class MeshError(Exception):
    """Base of every meshserve error; ``code`` is its gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(MeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(MeshError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MeshError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(MeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(MeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(MeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(MeshError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(MeshError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Cancelled(MeshError):
    code = grpc.StatusCode.CANCELLED


class Internal(MeshError):
    code = grpc.StatusCode.INTERNAL


def status_message(message: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """``message`` bounded to ``limit`` bytes of UTF-8 for a status: the head and the tail kept.

    A longer message keeps its first and last parts, joined by an ellipsis that
    says how many bytes were cut (an error names the problem at its start and
    often the expectation at its end). Never splits a character.
    """
    if len(message) * 4 <= limit:  # no UTF-8 character is longer than 4 bytes
        return message
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    marker_room = 32  # " …[1234567 bytes cut]… " and then some
    keep = max(limit - marker_room, 0)
    head = data[:keep * 2 // 3].decode("utf-8", "ignore")
    tail = data[len(data) - (keep - keep * 2 // 3):].decode("utf-8", "ignore")
    cut = len(data) - len(head.encode()) - len(tail.encode())
    return f"{head} {_CUT}[{cut} bytes cut]{_CUT} {tail}"


def drop_tracebacks(err: BaseException) -> None:
    """Drop the frames a handled error holds, and those of the errors it chains.

    A frame in a traceback keeps every local of its function alive (the
    request, its tensors), and a frame that also holds the error (``except
    ... as err: error = err``) makes a cycle that only the cyclic garbage
    collector frees. Call this once an error has been turned into a status
    or a response and nothing will read its traceback again.
    """
    seen = set()
    chained: BaseException | None = err
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        chained.__traceback__ = None
        chained = chained.__cause__ or chained.__context__


class Unauthenticated(MeshError):
    """The caller presented no credentials this server accepts."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MeshError):
    """The caller is known, but its role may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


_BY_CODE: dict[grpc.StatusCode, type[MeshError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted,
        DeadlineExceeded, Unavailable, Unimplemented, Cancelled, Internal, Unauthenticated, PermissionDenied,
    )
}


def error_for_status(code: grpc.StatusCode, message: str) -> MeshError:
    """The taxonomy's error for a gRPC status code (``MeshError`` for codes it has no type for)."""
    error = _BY_CODE.get(code, MeshError)(message)
    if type(error) is MeshError:
        error.code = code
    return error
