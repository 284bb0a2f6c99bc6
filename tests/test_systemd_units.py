"""deploy/systemd: every unit passes ``systemd-analyze verify`` and says what the daemons rely on."""

from __future__ import annotations

import configparser
import os
import pathlib
import shutil
import subprocess
import sys

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


DROP_IN = REPO_ROOT / "deploy" / "systemd" / "examples" / "meshserve-scheduler.service.d" / "etcd.conf"


def test_the_etcd_drop_in_example_passes_verify_and_names_only_real_settings(tmp_path):
    """systemd-analyze loads UNIT.d/*.conf beside the unit it verifies: an unknown key there is reported."""
    analyze = _analyze()
    unit = REPO_ROOT / "deploy" / "systemd" / "meshserve-scheduler.service"
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(INSTALLED_BIN, f"{REPO_ROOT / '.venv' / 'bin'}/"))
    (tmp_path / f"{unit.name}.d").mkdir()
    (tmp_path / f"{unit.name}.d" / DROP_IN.name).write_text(DROP_IN.read_text())
    done = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr

    settings = dict(value.split("=", 1) for value in _settings(DROP_IN)["Environment"])
    assert settings["MESHSERVE_SCHEDULER_STORE"].startswith("etcd://")
    settings["MESHSERVE_SCHEDULER_ID"] = "sched-1"          # %H is systemd's; any name will do here
    env = {key: value for key, value in os.environ.items() if not key.startswith("MESHSERVE_")}
    checked = subprocess.run([sys.executable, "-m", "meshserve.scheduler", "serve", "--help"],
                             env={**env, **settings}, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr          # an unknown MESHSERVE_SCHEDULER_* would exit 2
