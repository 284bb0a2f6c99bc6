"""One error taxonomy for the whole mesh.

Every error type carries the gRPC status code it travels as. Servers raise
these from domain code and one interceptor-like layer turns them into a
status; the client library maps a status code back to the same type, so
``except InvalidArgument`` works on both sides of the wire.
"""

from __future__ import annotations

import grpc


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
