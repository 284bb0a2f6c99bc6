"""meshserve's Python client library for the KServe v2 / Triton gRPC protocol.

``InferenceClient`` (blocking) and ``AsyncInferenceClient`` (asyncio) take
and return numpy arrays, send ``raw_input_contents`` by default, stream
decoupled models as iterators, apply deadlines, retry only what never reached
a model, raise the mesh's error taxonomy and carry W3C trace context.
``SharedMemory`` / ``AsyncSharedMemory`` move big tensors through a POSIX
shared memory region instead (same host only; ``clients.shared_memory``).
"""

from meshserve.common.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MeshError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

from .async_client import AsyncInferenceClient, AsyncInferStream
from .retry import RetryPolicy
from .shared_memory import AsyncSharedMemory, SharedMemory, SharedMemoryRegion
from .sync_client import InferenceClient, InferStream

__all__ = [
    "AlreadyExists",
    "AsyncInferStream",
    "AsyncInferenceClient",
    "AsyncSharedMemory",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InferStream",
    "InferenceClient",
    "Internal",
    "InvalidArgument",
    "MeshError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "SharedMemory",
    "SharedMemoryRegion",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]
