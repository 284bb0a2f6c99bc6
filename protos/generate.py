"""Regenerate the committed Python code for protos/**/*.proto.

    python -m protos.generate          # rewrite the *_pb2*.py files in place
    python -m protos.generate --check  # exit 1 if the committed files drift

Protos import each other by their repository path ("protos/inference/...")
so that generated modules import as the ``protos.inference`` package. The
check regenerates into a temporary directory and compares byte for byte, so
it needs the same grpcio-tools version that pyproject.toml pins.
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"


def proto_files() -> list[pathlib.Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Generate code for every proto into ``out_dir``; return generated paths relative to it."""
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    protos = [str(p.relative_to(REPO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{REPO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code drifts")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = pathlib.Path(tmp)
        generated = generate(tmp_dir)
        drifted = [
            rel for rel in generated
            if not (REPO_ROOT / rel).exists() or not filecmp.cmp(tmp_dir / rel, REPO_ROOT / rel, shallow=False)
        ]
        if args.check:
            for rel in drifted:
                print(f"drift: {rel} differs from what protoc generates", file=sys.stderr)
            if drifted:
                print("run: python -m protos.generate", file=sys.stderr)
            return 1 if drifted else 0
        for rel in generated:
            shutil.copyfile(tmp_dir / rel, REPO_ROOT / rel)
            print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
