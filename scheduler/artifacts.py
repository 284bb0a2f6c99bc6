"""The scheduler's blob directory: uploaded model bundles, kept under their content digest.

etcd (or SQLite) holds small values only; a revision stores just the digest
(``model.digest``) and the bundle lives here, one file per digest::

    ARTIFACT_DIR/sha256/<64 hex>.tar      a bundle whose content has that digest
    ARTIFACT_DIR/tmp/                     uploads in progress (removed when they end)

With several schedulers (an election), ARTIFACT_DIR must be one shared folder
(NFS or similar) so whichever leads holds every bundle; an S3 bucket
configured on the scheduler would do the same and is not built yet.

Guarantees: a bundle is in ``sha256/`` only once it was unpacked with every
member checked (common/artifacts.py: no links, devices, absolute paths or
``..``, within the size and file limits) and its content had the digest it
is filed under; it appears there by one atomic rename, so a reader never sees
a partial file. An upload over ``max_bytes`` is refused while it streams,
before it is written past the limit.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import uuid

from meshserve.common.artifacts import ArtifactError, check_digest, unpack
from meshserve.common.errors import InvalidArgument, ResourceExhausted

DEFAULT_ARTIFACT_DIR = "/var/lib/meshserve/artifacts"
DEFAULT_MAX_BUNDLE_BYTES = 64 << 30


class BlobStore:
    """Bundles by digest in one folder. Blocking file work: call from a thread (``asyncio.to_thread``)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES):
        self.root = pathlib.Path(root)
        self.max_bytes = max_bytes

    def path(self, digest: str) -> pathlib.Path:
        return self.root / "sha256" / f"{check_digest(digest).split(':', 1)[1]}.tar"

    def size(self, digest: str) -> int | None:
        """The bundle's size, or None when this store does not hold it."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def new_upload(self) -> pathlib.Path:
        """A fresh temporary file path for an upload in progress."""
        folder = self.root / "tmp"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{uuid.uuid4().hex}.tar"

    def check_size(self, declared: int) -> None:
        if declared > self.max_bytes:
            raise ResourceExhausted(f"the bundle is {declared} bytes, more than this scheduler's limit of "
                                    f"{self.max_bytes} (--max-artifact-size)")

    def accept(self, upload: pathlib.Path, digest: str) -> None:
        """File the finished upload under ``digest`` if its content has that digest; removes ``upload``
        either way. ``InvalidArgument`` (digest mismatch, a bad archive) otherwise."""
        check_digest(digest)
        unpacked = pathlib.Path(tempfile.mkdtemp(prefix="check-", dir=upload.parent))
        try:
            try:
                actual = unpack(upload, unpacked, max_bytes=self.max_bytes)
            except ArtifactError as err:
                raise InvalidArgument(f"bundle refused: {err.message}") from None
            if actual != digest:
                raise InvalidArgument(f"bundle refused: its content digest is {actual}, not {digest} as declared")
            final = self.path(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(upload, final)
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)
            upload.unlink(missing_ok=True)
