"""The package's shape: one ``meshserve`` namespace, and the import boundaries between its components.

The contracts themselves live in pyproject.toml (``[tool.importlinter]``) and
are checked by import-linter on the installed package.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import tomllib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
COMPONENT_FOLDERS = ("common", "protos", "runtime", "scheduler", "node_agent", "proxy", "clients")
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_the_import_contracts_hold():
    lint = pathlib.Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), str(REPO_ROOT / "pyproject.toml")], cwd="/", capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_package_folder_is_packaged_under_meshserve():
    setuptools = PYPROJECT["tool"]["setuptools"]
    declared = set(setuptools["packages"])
    on_disk = {
        "meshserve." + ".".join(init.parent.relative_to(REPO_ROOT).parts)
        for folder in COMPONENT_FOLDERS for init in (REPO_ROOT / folder).rglob("__init__.py")
    }
    assert on_disk == declared, f"pyproject packages differ from the folders: {sorted(on_disk ^ declared)}"
    assert setuptools["package-dir"] == {f"meshserve.{folder}": folder for folder in COMPONENT_FOLDERS}


def _top_level_imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_nothing_imports_a_component_by_its_folder_name():
    """``import runtime`` would work from a checkout (the folder is on sys.path) and fail once installed."""
    offenders = [
        f"{path.relative_to(REPO_ROOT)} imports {sorted(found)}"
        for path in sorted(REPO_ROOT.rglob("*.py"))
        if ".venv" not in path.parts and not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
        for found in [_top_level_imports(path) & set(COMPONENT_FOLDERS)] if found
    ]
    assert not offenders, "\n".join(offenders)


def test_the_client_library_ships_its_types():
    assert (REPO_ROOT / "clients" / "py.typed").exists()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["meshserve.clients"]
