#!/usr/bin/env bash
# Install everything meshserve needs, on a fresh Debian/Ubuntu machine or an existing checkout.
# Idempotent: system packages only when missing, a virtualenv at .venv, the project in editable mode
# with its development extras. Safe to run before every command.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v etcd >/dev/null || missing+=(etcd-server)   # a real etcd for the store and election tests
command -v systemd-analyze >/dev/null || missing+=(systemd)   # `systemd-analyze verify` of deploy/systemd units
if [ ${#missing[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"meshserve needs Python >= 3.11; python3 is {sys.version.split()[0]}")
PY

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
echo "meshserve installed in $(pwd)/.venv"
