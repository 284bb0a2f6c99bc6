"""deploy/systemd: every unit passes ``systemd-analyze verify`` and says what the daemons rely on."""

from __future__ import annotations

import configparser
import os
import pathlib
import shutil
import subprocess

import pytest
from conftest import REPO_ROOT

UNITS = sorted((REPO_ROOT / "deploy" / "systemd").glob("*.service"))
INSTALLED_BIN = "/opt/meshserve/venv/bin/"


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing: scripts/install.sh installs Debian's systemd")
        pytest.skip("systemd-analyze is not installed (scripts/install.sh installs Debian's systemd)")
    return path


def _settings(unit: pathlib.Path) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_every_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = _analyze()
    assert UNITS, "no unit in deploy/systemd"
    local = []
    for unit in UNITS:   # the installed prefix becomes this checkout's virtualenv, which verify checks exists
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace(INSTALLED_BIN, f"{REPO_ROOT / '.venv' / 'bin'}/"))
        local.append(str(copy))
    done = subprocess.run([analyze, "verify", *local], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.stem)
def test_each_unit_is_a_notify_service_with_a_watchdog_restarts_and_hardening(unit):
    settings = _settings(unit)
    configparser.ConfigParser(strict=False, interpolation=None).read_string(
        unit.read_text().replace("%", "%%"))   # well-formed sections
    assert settings["Type"] == ["notify"] and settings["NotifyAccess"] == ["main"]
    assert settings["Restart"] == ["on-failure"] and settings["WatchdogSec"]
    assert settings["ProtectSystem"] == ["strict"] and settings["ProtectHome"] == ["yes"]
    assert settings["PrivateTmp"] == ["yes"] and settings["LimitNOFILE"]
    assert settings["ExecStart"][0].startswith(INSTALLED_BIN)
    if unit.stem == "meshserve-node-agent":
        assert settings["KillMode"] == ["mixed"]   # the agent drains its replicas itself
        assert "char-nvidia rw" in settings["DeviceAllow"] and settings["DevicePolicy"] == ["closed"]
    else:
        assert settings["NoNewPrivileges"] == ["yes"] and settings["User"] == ["meshserve"]
