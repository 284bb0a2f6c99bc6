"""The content digest, the bundle format and safe unpacking (common/artifacts.py)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pytest

from meshserve.common.artifacts import (
    ArtifactError,
    canonical_listing,
    check_digest,
    digest_folder,
    pack,
    short,
    unpack,
)


def model(folder, files: dict[str, bytes]):
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def test_the_digest_is_sha256_over_the_documented_listing(tmp_path):
    folder = model(tmp_path / "m", {"config.pbtxt": b"name: 'm'\n", "1/model.py": b"print(1)\n"})
    listing = canonical_listing(folder)
    expected = "".join(f"{hashlib.sha256(data).hexdigest()} {len(data)} {name}\n" for name, data in
                       sorted({"config.pbtxt": b"name: 'm'\n", "1/model.py": b"print(1)\n"}.items()))
    assert listing.decode() == expected
    assert digest_folder(folder) == "sha256:" + hashlib.sha256(expected.encode()).hexdigest()
    assert short(digest_folder(folder)) == digest_folder(folder)[:19]


def test_times_modes_and_empty_folders_do_not_count_but_bytes_and_names_do(tmp_path):
    a = model(tmp_path / "a", {"config.pbtxt": b"x", "1/model.py": b"y"})
    b = model(tmp_path / "b", {"1/model.py": b"y", "config.pbtxt": b"x"})
    os.utime(b / "config.pbtxt", (1, 1))
    os.chmod(b / "1" / "model.py", 0o700)
    (b / "empty").mkdir()
    assert digest_folder(a) == digest_folder(b)
    (b / "1" / "model.py").write_bytes(b"z")
    assert digest_folder(a) != digest_folder(b)
    c = model(tmp_path / "c", {"config.pbtxt": b"x", "2/model.py": b"y"})
    assert digest_folder(a) != digest_folder(c)


def test_a_folder_with_a_symlink_or_fifo_has_no_digest(tmp_path):
    folder = model(tmp_path / "m", {"config.pbtxt": b"x"})
    (folder / "link").symlink_to("/etc/passwd")
    with pytest.raises(ArtifactError, match="symlink"):
        digest_folder(folder)
    (folder / "link").unlink()
    os.mkfifo(folder / "pipe")
    with pytest.raises(ArtifactError, match="not a regular file"):
        digest_folder(folder)
    with pytest.raises(ArtifactError, match="does not exist"):
        digest_folder(tmp_path / "missing")


def test_check_digest_refuses_anything_but_sha256_hex():
    good = "sha256:" + "0" * 64
    assert check_digest(good) == good
    for bad in ("", "sha256:" + "0" * 63, "sha256:" + "G" * 64, "md5:" + "0" * 64, "sha256:" + "A" * 64):
        with pytest.raises(ArtifactError):
            check_digest(bad)


def test_pack_then_unpack_gives_back_the_same_digest(tmp_path):
    folder = model(tmp_path / "m", {"config.pbtxt": b"x" * 10, "1/model.py": b"y", "1/weights.bin": os.urandom(5000)})
    bundle = tmp_path / "bundle.tar"
    with open(bundle, "wb") as out:
        pack(folder, out)
    assert unpack(bundle, tmp_path / "out") == digest_folder(folder)
    again = tmp_path / "bundle2.tar"
    with open(again, "wb") as out:
        pack(folder, out)
    assert bundle.read_bytes() == again.read_bytes()     # deterministic: same files, same bytes


def _tar(path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w"):
    with tarfile.open(path, mode) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


@pytest.mark.parametrize(("member", "message"), [
    (_file("../escape.py"), "leaves the folder"),
    (_file("1/../../escape.py"), "leaves the folder"),
    (_file("/etc/cron.d/evil"), "absolute path"),
    (_special("link", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
    (_special("hard", tarfile.LNKTYPE, "config.pbtxt"), "is a link"),
    (_special("dev", tarfile.CHRTYPE), "special file"),
    (_special("fifo", tarfile.FIFOTYPE), "special file"),
])
def test_unpack_refuses_hostile_members_and_writes_nothing(tmp_path, member, message):
    archive = _tar(tmp_path / "evil.tar", [_file("config.pbtxt"), member])
    dest = tmp_path / "out"
    with pytest.raises(ArtifactError, match=message):
        unpack(archive, dest)
    assert not dest.exists()
    assert not (tmp_path / "escape.py").exists()


def test_unpack_bounds_size_and_member_count(tmp_path):
    big = _tar(tmp_path / "big.tar.gz", [_file("weights.bin", b"\0" * 100_000)], mode="w:gz")
    assert big.stat().st_size < 1000                     # a small gzip that claims much more
    with pytest.raises(ArtifactError, match="more than the limit of 50000 bytes"):
        unpack(big, tmp_path / "out", max_bytes=50_000)
    many = _tar(tmp_path / "many.tar", [_file(f"f{i}") for i in range(20)])
    with pytest.raises(ArtifactError, match="20 members, more than the limit of 10"):
        unpack(many, tmp_path / "out2", max_files=10)


def test_unpack_refuses_garbage_and_a_truncated_archive(tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(ArtifactError, match="not a readable tar"):
        unpack(garbage, tmp_path / "out")
    folder = model(tmp_path / "m", {"weights.bin": os.urandom(100_000)})
    whole = tmp_path / "whole.tar"
    with open(whole, "wb") as out:
        pack(folder, out)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:50_000])
    with pytest.raises(ArtifactError):
        unpack(cut, tmp_path / "out3")
