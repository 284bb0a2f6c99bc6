#!/usr/bin/env bash
# Install meshserve on this host, as root:   sudo deploy/install.sh [--from WHEEL|SOURCE_DIR]
#
#   1. the service user and group `meshserve` (a system account without a login shell);
#   2. a virtualenv in /opt/meshserve/venv with meshserve installed (this checkout, or --from a wheel);
#   3. the configuration skeleton /etc/meshserve/{scheduler,node-agent,proxy}.env, only where absent:
#      an operator's files are never overwritten;
#   4. the units meshserve-{scheduler,node-agent,proxy}.service in /etc/systemd/system, then daemon-reload.
#   Nothing is enabled or started: `systemctl enable --now meshserve-scheduler` (README "Run on your hosts").
#
# Idempotent: run it again to upgrade (the virtualenv is kept and meshserve reinstalled). Undo: deploy/uninstall.sh.
#
# DESTDIR=/some/root puts every path under that root (packaging, tests); the user is then created in
# DESTDIR/etc/passwd (useradd --prefix) and systemd is not asked to reload.
# PYTHON (default python3) makes the virtualenv; MESHSERVE_PIP_ARGS is added to `pip install`
# (e.g. "--no-index --find-links /srv/wheels" on a host without network).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source_dir="$(dirname "$here")"
from="$source_dir"
while [ $# -gt 0 ]; do
  case "$1" in
    --from) from="${2:?--from needs a wheel or a source directory}"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

root="${DESTDIR:-}"
root="${root%/}"
prefix="$root/opt/meshserve"
etc="$root/etc/meshserve"
units="$root/etc/systemd/system"
python="${PYTHON:-python3}"
user=meshserve

say() { echo "install.sh: $*"; }

if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (or set DESTDIR to install under another root)" >&2
  exit 1
fi
if [ ! -e "$from" ]; then
  echo "install.sh: --from $from does not exist" >&2
  exit 2
fi

# 1. The service user.
prefix_args=()
[ -n "$root" ] && prefix_args=(--prefix "$root")
if grep -q "^$user:" "$root/etc/passwd" 2>/dev/null; then
  say "user $user exists"
elif [ -n "$root" ] && [ ! -e "$root/etc/passwd" ]; then
  say "no $root/etc/passwd: user $user not created"
else
  useradd "${prefix_args[@]}" --system --user-group --home-dir /var/lib/meshserve --no-create-home \
    --shell /usr/sbin/nologin --comment "meshserve daemons" "$user"
  say "created user $user"
fi

# 2. The virtualenv and meshserve in it.
if [ ! -x "$prefix/venv/bin/python" ]; then
  mkdir -p "$prefix"
  "$python" -m venv "$prefix/venv"
  say "created $prefix/venv"
fi
# shellcheck disable=SC2086  # MESHSERVE_PIP_ARGS is a list of words
"$prefix/venv/bin/python" -m pip install --quiet --disable-pip-version-check ${MESHSERVE_PIP_ARGS:-} "$from"
say "installed meshserve from $from into $prefix/venv"
if [ -d "$source_dir/docs" ]; then
  mkdir -p "$prefix/docs"
  cp -f "$source_dir"/docs/*.md "$prefix/docs/"
fi

# 3. The configuration skeleton: never overwrite what an operator wrote.
install -d -m 0750 "$etc"
for daemon in scheduler node-agent proxy; do
  if [ -e "$etc/$daemon.env" ]; then
    say "$etc/$daemon.env exists; kept"
  else
    install -m 0640 "$here/config/$daemon.env" "$etc/$daemon.env"
    say "wrote $etc/$daemon.env"
  fi
done
if [ -z "$root" ]; then
  chgrp "$user" "$etc" "$etc"/*.env
else
  group_id="$(awk -F: -v u="$user" '$1 == u { print $3 }' "$root/etc/group" 2>/dev/null || true)"
  [ -n "$group_id" ] && { chgrp "$group_id" "$etc" "$etc"/*.env 2>/dev/null || true; }
fi

# 4. The units: ours, replaced on every run.
install -d "$units"
for unit in "$here"/systemd/*.service; do
  install -m 0644 "$unit" "$units/$(basename "$unit")"
done
say "installed the units in $units"
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  say "systemd reloaded; start with: systemctl enable --now meshserve-scheduler (README \"Run on your hosts\")"
fi
