#!/usr/bin/env bash
# Remove what deploy/install.sh installed, as root:   sudo deploy/uninstall.sh [--purge]
#
#   stops and disables the three units, removes them and /opt/meshserve;
#   keeps /etc/meshserve (configuration), /var/lib/meshserve (the store, replicas' logs) and the user,
#   unless --purge, which removes those too.
#
# Idempotent: what is already gone is skipped. DESTDIR as for install.sh.
set -euo pipefail

purge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --purge) purge=1; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "uninstall.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

root="${DESTDIR:-}"
root="${root%/}"
user=meshserve
units=(meshserve-scheduler.service meshserve-node-agent.service meshserve-proxy.service)

say() { echo "uninstall.sh: $*"; }

if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
  echo "uninstall.sh: run as root (or set DESTDIR)" >&2
  exit 1
fi

if [ -z "$root" ] && [ -d /run/systemd/system ]; then
  systemctl disable --now "${units[@]}" 2>/dev/null || true
fi
for unit in "${units[@]}"; do
  if [ -e "$root/etc/systemd/system/$unit" ]; then
    rm -f "$root/etc/systemd/system/$unit"
    say "removed $root/etc/systemd/system/$unit"
  fi
done
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
if [ -d "$root/opt/meshserve" ]; then
  rm -rf "$root/opt/meshserve"
  say "removed $root/opt/meshserve"
fi

if [ "$purge" = 1 ]; then
  for dir in "$root/etc/meshserve" "$root/var/lib/meshserve"; do
    if [ -d "$dir" ]; then
      rm -rf "$dir"
      say "removed $dir"
    fi
  done
  if grep -q "^$user:" "$root/etc/passwd" 2>/dev/null; then
    prefix_args=()
    [ -n "$root" ] && prefix_args=(--prefix "$root")
    userdel "${prefix_args[@]}" "$user"
    say "removed user $user"
  fi
else
  say "kept $root/etc/meshserve, $root/var/lib/meshserve and user $user (--purge removes them)"
fi
