"""Regenerate the committed Python code for protos/**/*.proto.

    python -m meshserve.protos.generate          # rewrite the *_pb2*.py files in place
    python -m meshserve.protos.generate --check  # exit 1 if the committed files drift

Protos import each other by their installed path ("meshserve/protos/inference/...")
so that generated modules import as the ``meshserve.protos.inference`` package.
The check regenerates into a temporary directory and compares byte for byte,
so it needs the same grpcio-tools version that pyproject.toml pins. That
version bundles protobuf 6.33, so the generated code runs on the protobuf 6.x
that Triton's current client needs and on protobuf 7.x, which accepts older
gencode (tests/test_wheel_install.py installs the wheel beside both).
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
IMPORT_PREFIX = pathlib.Path("meshserve", "protos")   # where PROTO_ROOT installs: the import path protoc sees


def proto_files() -> list[pathlib.Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Generate code for every proto into ``out_dir``; return generated paths relative to PROTO_ROOT.

    protoc sees the repository's ``protos/`` folder as ``meshserve/protos`` (a symlink in a temporary
    include root), so generated modules import each other as ``meshserve.protos.*``, the way they install.
    """
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        (root / IMPORT_PREFIX).parent.mkdir(parents=True)
        (root / IMPORT_PREFIX).symlink_to(PROTO_ROOT, target_is_directory=True)
        protos = [str(IMPORT_PREFIX / p.relative_to(PROTO_ROOT)) for p in proto_files()]
        args = [
            "protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    generated_root = out_dir / IMPORT_PREFIX
    for module in generated_root.rglob("*_pb2.py"):
        module.write_text(use_own_pool(module.read_text()))
    return sorted(p.relative_to(generated_root) for p in generated_root.rglob("*_pb2*.py*"))


def use_own_pool(source: str) -> str:
    """Register the generated file in meshserve's descriptor pool (protos/pool.py) instead of the default one."""
    builder_import = "from google.protobuf.internal import builder as _builder\n"
    default_pool = "_descriptor_pool.Default().AddSerializedFile("
    if source.count(builder_import) != 1 or source.count(default_pool) != 1:
        raise SystemExit("protoc's output changed shape: update use_own_pool in protos/generate.py")
    source = source.replace(builder_import, builder_import + "from meshserve.protos.pool import POOL as _meshserve_pool\n")
    return source.replace(default_pool, "_meshserve_pool.AddSerializedFile(")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code drifts")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = pathlib.Path(tmp)
        generated = generate(tmp_dir)
        generated_root = tmp_dir / IMPORT_PREFIX
        drifted = [
            rel for rel in generated
            if not (PROTO_ROOT / rel).exists() or not filecmp.cmp(generated_root / rel, PROTO_ROOT / rel, shallow=False)
        ]
        if args.check:
            for rel in drifted:
                print(f"drift: protos/{rel} differs from what protoc generates", file=sys.stderr)
            if drifted:
                print("run: python -m meshserve.protos.generate", file=sys.stderr)
            return 1 if drifted else 0
        for rel in generated:
            shutil.copyfile(generated_root / rel, PROTO_ROOT / rel)
            print(f"wrote protos/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
