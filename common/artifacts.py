"""Model artifacts: the content digest, the bundle (tar) format, and safe unpacking.

Used on both sides: ``scheduler ctl apply`` digests and packs a model folder,
the scheduler checks an upload, the node agent checks what it fetched.

The content digest (``sha256:`` and 64 hex digits) is the SHA-256 of the
folder's *canonical listing*: one line per regular file, sorted by its path
relative to the folder ('/'-separated, compared as UTF-8 bytes)::

    <sha256 hex of the file's bytes> <size in bytes> <relative path>\\n

Directories are implied by the paths (an empty one does not count); names,
owners, times and permissions do not count, so the same files give the same
digest on every host. A folder that holds a symlink, a device, a FIFO or a
socket, or a path that is not UTF-8 or holds a newline, has no digest
(``ArtifactError``): what a replica serves must be plain files.

A bundle is a tar archive (gzip allowed when unpacking) of those files with
paths relative to the model folder. ``unpack`` refuses (``ArtifactError``,
before writing anything outside ``dest``) absolute paths, ``..``, links,
devices and any member but plain files and folders, more than ``max_files``
members, and more than ``max_bytes`` of content; what it wrote is then
digested, so a bundle whose content is not the digest it was named by is
never accepted (callers compare).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import stat
import tarfile
from collections.abc import Iterator
from typing import IO

from .errors import InvalidArgument

DIGEST_PREFIX = "sha256:"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_READ_CHUNK = 1 << 20
# Far beyond any model folder; bounds what a hostile archive can make us create.
DEFAULT_MAX_FILES = 100_000
DEFAULT_MAX_BYTES = 64 << 30
_MAX_PATH = 4096


class ArtifactError(InvalidArgument):
    """A folder or bundle that is not a valid artifact; the message names the problem."""


def check_digest(digest: str) -> str:
    """``digest`` if it is ``sha256:`` and 64 lowercase hex digits; ``ArtifactError`` otherwise."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        shown = digest[:80] if isinstance(digest, str) else type(digest).__name__
        raise ArtifactError(f"{shown!r} is not a content digest (sha256: and 64 lowercase hex digits)")
    return digest


def short(digest: str) -> str:
    """``sha256:0123456789ab``: enough to tell revisions apart in a table."""
    return digest[: len(DIGEST_PREFIX) + 12] if digest else ""


def _files(root: pathlib.Path) -> Iterator[tuple[str, pathlib.Path]]:
    """(relative posix path, absolute path) of every regular file under ``root``; refuses anything else."""
    for folder, dirs, names in os.walk(root, followlinks=False):
        for name in dirs + names:
            full = pathlib.Path(folder, name)
            relative = full.relative_to(root).as_posix()
            mode = os.lstat(full).st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
                raise ArtifactError(f"{relative!r} in {str(root)!r} is {kind} (a model folder holds plain files)")
            try:
                relative.encode("utf-8")
            except UnicodeEncodeError:
                raise ArtifactError(f"{relative!r} in {str(root)!r} is not a UTF-8 name") from None
            if "\n" in relative:
                raise ArtifactError(f"{relative!r} in {str(root)!r} has a newline in its name")
            yield relative, full


def file_list(root: str | os.PathLike) -> list[tuple[str, pathlib.Path]]:
    """The regular files under ``root`` in canonical order (``ArtifactError`` for links and special files)."""
    base = pathlib.Path(root)
    if not base.is_dir():
        raise ArtifactError(f"model folder {str(base)!r} does not exist or is not a folder")
    return sorted(_files(base), key=lambda item: item[0].encode("utf-8"))


def sha256_file(path: pathlib.Path) -> tuple[str, int]:
    """(hex digest, size) of one file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def canonical_listing(root: str | os.PathLike) -> bytes:
    """The listing the digest is taken over (see the module docstring)."""
    lines = []
    for relative, full in file_list(root):
        hex_digest, size = sha256_file(full)
        lines.append(f"{hex_digest} {size} {relative}\n")
    return "".join(lines).encode("utf-8")


def digest_folder(root: str | os.PathLike) -> str:
    """The content digest of a model folder. Blocking: call it in a thread from asyncio."""
    return DIGEST_PREFIX + hashlib.sha256(canonical_listing(root)).hexdigest()


def folder_size(root: str | os.PathLike) -> int:
    return sum(full.stat().st_size for _, full in file_list(root))


def pack(root: str | os.PathLike, out: IO[bytes]) -> None:
    """Write the bundle of a model folder to ``out``: an uncompressed tar, files in canonical order,
    owners, times and modes normalised (models are mostly incompressible weights; gzip would cost
    more CPU than it saves bytes)."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for relative, full in file_list(root):
            info = tarfile.TarInfo(relative)
            info.size = full.stat().st_size
            info.mode = 0o644
            with open(full, "rb") as handle:
                archive.addfile(info, handle)


def unpack(archive_path: str | os.PathLike, dest: str | os.PathLike, *, max_files: int = DEFAULT_MAX_FILES,
           max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Unpack a bundle (tar, or gzip'd tar) into the empty or new folder ``dest``; its content digest.

    Every member is checked before any is written; ``ArtifactError`` names the first bad one.
    Blocking: call it in a thread from asyncio."""
    target = pathlib.Path(dest)
    try:
        with tarfile.open(archive_path, mode="r:*") as archive:
            members = archive.getmembers()
            _check_members(members, max_files, max_bytes)
            target.mkdir(parents=True, exist_ok=True)
            archive.extractall(target, members=members, filter="data")
    except tarfile.TarError as err:
        raise ArtifactError(f"not a readable tar archive: {err}") from None
    except EOFError:
        raise ArtifactError("the archive is truncated") from None
    return digest_folder(target)


def _check_members(members: list[tarfile.TarInfo], max_files: int, max_bytes: int) -> None:
    if len(members) > max_files:
        raise ArtifactError(f"the archive has {len(members)} members, more than the limit of {max_files}")
    total = 0
    for member in members:
        name = member.name
        shown = name[:200]
        if not name or "\0" in name or len(name) > _MAX_PATH or "\n" in name:
            raise ArtifactError(f"archive member {shown!r} has an invalid name")
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            raise ArtifactError(f"archive member {shown!r} is an absolute path")
        if ".." in pathlib.PurePosixPath(name).parts:
            raise ArtifactError(f"archive member {shown!r} leaves the folder ('..')")
        if member.issym() or member.islnk():
            raise ArtifactError(f"archive member {shown!r} is a link (a model bundle holds plain files)")
        if not (member.isfile() or member.isdir()):
            raise ArtifactError(f"archive member {shown!r} is a device, FIFO or other special file")
        total += member.size
        if total > max_bytes:
            raise ArtifactError(f"the archive holds more than the limit of {max_bytes} bytes")
