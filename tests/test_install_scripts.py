"""deploy/install.sh and deploy/uninstall.sh, run for real into a DESTDIR under tmp (never the host's root):
the user, the virtualenv with meshserve installed from a wheel built here, the configuration skeleton
(an operator's edit survives a second run) and the units; then the uninstall, twice, and the purge.
The configuration skeletons name only real settings: each daemon accepts all of them."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
SCRIPT_TIMEOUT_S = 300.0
DAEMONS = {"scheduler": ["-m", "meshserve.scheduler", "serve"], "node-agent": ["-m", "meshserve.node_agent"],
           "proxy": ["-m", "meshserve.proxy"]}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """This checkout as a wheel, built offline with the test environment's setuptools, from a copy (a build
    leaves build/ and *.egg-info behind in its source)."""
    source = tmp_path_factory.mktemp("source") / "meshserve"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".meshserve-dev"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(out), str(source)], check=True, timeout=SCRIPT_TIMEOUT_S)
    [built] = out.glob("meshserve-*.whl")
    return built


def seeded_root(tmp_path):
    """A root with the account files useradd --prefix edits."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc" / "gshadow").write_text("root:*::\n")
    return root


def run(script: str, root, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DESTDIR": str(root), "MESHSERVE_PIP_ARGS": "--no-deps --no-index",
           "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(DEPLOY / script), *args], env=env, capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def users(root) -> list[str]:
    return [line.split(":")[0] for line in (root / "etc" / "passwd").read_text().splitlines()]


def test_install_is_idempotent_keeps_the_operators_config_and_uninstalls(tmp_path, wheel):
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("useradd --prefix needs root and the shadow utilities")
    root = seeded_root(tmp_path)
    run("install.sh", root, "--from", str(wheel))

    assert users(root).count("meshserve") == 1
    venv = root / "opt" / "meshserve" / "venv"
    for command in ("scheduler", "node-agent", "mesh-proxy"):
        assert (venv / "bin" / command).exists(), command
    assert list(venv.glob("lib/python*/site-packages/meshserve/scheduler/ctl.py"))
    etc = root / "etc" / "meshserve"
    for daemon in DAEMONS:
        config = etc / f"{daemon}.env"
        assert config.read_text() == (DEPLOY / "config" / f"{daemon}.env").read_text()
        assert stat.S_IMODE(config.stat().st_mode) == 0o640       # may hold a password file's path, tokens
    for unit in (DEPLOY / "systemd").glob("*.service"):
        assert (root / "etc" / "systemd" / "system" / unit.name).read_text() == unit.read_text()

    edited = etc / "scheduler.env"
    edited.write_text("MESHSERVE_SCHEDULER_LISTEN=0.0.0.0:7070\n")
    again = run("install.sh", root, "--from", str(wheel))
    assert "scheduler.env exists; kept" in again.stdout and "user meshserve exists" in again.stdout
    assert edited.read_text() == "MESHSERVE_SCHEDULER_LISTEN=0.0.0.0:7070\n"
    assert users(root).count("meshserve") == 1

    run("uninstall.sh", root)
    assert not (root / "opt" / "meshserve").exists()
    assert not list((root / "etc" / "systemd" / "system").glob("meshserve-*"))
    assert edited.exists() and "meshserve" in users(root)          # kept without --purge
    run("uninstall.sh", root)                                        # again: nothing left to do, no error
    run("uninstall.sh", root, "--purge")
    assert not etc.exists() and "meshserve" not in users(root)
    run("uninstall.sh", root, "--purge")


def test_install_refuses_a_missing_source(tmp_path):
    env = {**os.environ, "DESTDIR": str(tmp_path / "root")}
    done = subprocess.run(["bash", str(DEPLOY / "install.sh"), "--from", str(tmp_path / "nothing.whl")], env=env,
                          capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("daemon", sorted(DAEMONS))
def test_every_setting_in_a_config_skeleton_is_one_the_daemon_accepts(daemon):
    """Each commented example, uncommented, is read without complaint (an unknown name would exit 2)."""
    settings = {}
    for line in (DEPLOY / "config" / f"{daemon}.env").read_text().splitlines():
        line = line.lstrip("#").strip()
        key, sep, value = line.partition("=")
        if sep and key.startswith("MESHSERVE_") and " " not in key:
            settings[key] = value
    assert any(key.startswith("MESHSERVE_" + daemon.upper().replace("-", "_")) for key in settings)
    env = {key: value for key, value in os.environ.items() if not key.startswith("MESHSERVE_")}
    done = subprocess.run([sys.executable, *DAEMONS[daemon], "--help"], env={**env, **settings}, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
