"""The files that make up the repository: what git tracks plus new files it does not ignore."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

# Without git (an unpacked archive): everything except these build outputs and local state.
_NOT_SOURCES = (".git", ".venv", "build", "dist", "__pycache__", "*.egg-info", ".pytest_cache", ".meshserve-dev")


def repository_files(root: pathlib.Path) -> list[pathlib.Path]:
    """Paths relative to ``root`` of every file of the repository that exists on disk, sorted.

    With git: tracked files and untracked ones that .gitignore does not exclude (so a file not yet
    committed counts), less tracked files deleted from the work tree. Without git: every file outside
    the usual build outputs, virtualenvs and caches."""
    if (root / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=root, capture_output=True, check=True).stdout.decode()
        names = {pathlib.Path(name) for name in listed.split("\0") if name}
        return sorted(name for name in names if (root / name).is_file())
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.is_file() and not any(part_matches(part) for part in relative.parts):
            found.append(relative)
    return sorted(found)


def part_matches(part: str) -> bool:
    return any(pathlib.PurePath(part).match(pattern) for pattern in _NOT_SOURCES)


def copy_repository(root: pathlib.Path, destination: pathlib.Path) -> None:
    """Copy the repository's files (``repository_files``) into ``destination``, keeping their layout."""
    for relative in repository_files(root):
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / relative, target)
