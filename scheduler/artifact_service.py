"""``mesh.ArtifactService``: uploads from ``scheduler ctl apply``, downloads by node agents.

Guarantees: an upload is refused with RESOURCE_EXHAUSTED as soon as its
declared or streamed size passes the blob store's limit, with
INVALID_ARGUMENT when it is shorter or longer than declared, is not a safe
bundle, or its content is not the digest it names; only a checked bundle is
kept (scheduler/artifacts.py). The temporary file of an upload that fails or
is cancelled is removed. File work runs in threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib

from meshserve.common.artifacts import check_digest
from meshserve.common.errors import InvalidArgument, NotFound
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc

from .artifacts import BlobStore

CHUNK_BYTES = 1 << 20   # well under the control plane's message limit (common/limits.py)


class ArtifactService(mesh_grpc.ArtifactServiceServicer):
    def __init__(self, blobs: BlobStore):
        self.blobs = blobs

    async def Stat(self, request, context):
        digest = check_digest(request.digest)
        size = await asyncio.to_thread(self.blobs.size, digest)
        return mesh.ArtifactInfo(digest=digest, present=size is not None, size_bytes=size or 0)

    async def Upload(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None:
            raise InvalidArgument("an upload needs a first chunk naming the digest and size")
        digest = check_digest(first.digest)
        declared = first.size_bytes
        self.blobs.check_size(declared)
        upload = await asyncio.to_thread(self.blobs.new_upload)
        try:
            received = 0
            handle = await asyncio.to_thread(open, upload, "wb")
            try:
                chunk = first
                while chunk is not None:
                    received += len(chunk.data)
                    if received > declared:
                        raise InvalidArgument(f"the upload is longer than the {declared} bytes declared")
                    if chunk.data:
                        await asyncio.to_thread(handle.write, chunk.data)
                    chunk = await anext(aiter(request_iterator), None)
            finally:
                await asyncio.to_thread(handle.close)
            if received != declared:
                raise InvalidArgument(f"the upload is truncated: {received} of {declared} bytes")
            await asyncio.to_thread(self.blobs.accept, upload, digest)
        finally:
            with contextlib.suppress(OSError):
                upload.unlink(missing_ok=True)
        return mesh.ArtifactInfo(digest=digest, present=True, size_bytes=declared)

    async def Download(self, request, context):
        digest = check_digest(request.digest)
        path = self.blobs.path(digest)
        try:
            handle = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError:
            raise NotFound(f"this scheduler holds no bundle {digest}; apply the deployment again "
                           f"from `scheduler ctl` to upload it") from None
        with handle:
            size = await asyncio.to_thread(lambda: path.stat().st_size)
            first = True
            while data := await asyncio.to_thread(handle.read, CHUNK_BYTES):
                yield mesh.ArtifactChunk(digest=digest if first else "", size_bytes=size if first else 0,
                                         data=data)
                first = False
            if first:
                yield mesh.ArtifactChunk(digest=digest, size_bytes=0)
