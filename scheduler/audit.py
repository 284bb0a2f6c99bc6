"""The audit log: one JSON line per mutating admin call, allowed or refused.

Each line: ``time`` (UTC, ISO 8601, milliseconds), ``who`` (``ROLE/NAME``,
or null when the caller was not identified), ``method`` (the RPC's short
name), ``target`` (what it changed: ``deployment/NAME``, ``node/NAME``, or
the deployments a spec names), ``outcome`` (``OK`` or the gRPC status code
name) and ``detail`` (the refusal's message). Lines go to ``--audit-log
FILE`` (appended, flushed per line, file created 0600), else to the
scheduler's log at INFO under the logger ``meshserve.audit``.

Written by the scheduler's ``AuthInterceptor`` (protos/security/auth.py),
with authentication off too (``who`` is then null: every caller is anonymous).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading

import yaml

from meshserve.common.security.identity import Identity

LOGGER_NAME = "meshserve.audit"
_NODE_METHODS = ("Cordon", "Uncordon", "Drain", "DeleteNode")


def target_of(method: str, request) -> str:
    """What a mutating admin call is about, from its request (best effort: a spec that does not parse says so)."""
    short = method.rsplit("/", 1)[-1]
    if short == "Apply":
        try:
            names = [str(doc.get("name") or (doc.get("metadata") or {}).get("name") or "?")
                     for doc in yaml.safe_load_all(request.spec_yaml) if isinstance(doc, dict)]
        except yaml.YAMLError:
            return "spec (unparsable)"
        return ",".join(f"deployment/{name}" for name in names) or "spec (empty)"
    name = getattr(request, "name", "") or "?"
    return f"{'node' if short in _NODE_METHODS else 'deployment'}/{name}"


class AuditLog:
    """Writes audit lines to a file (``path``) or to the ``meshserve.audit`` logger."""

    def __init__(self, path: str | None = None):
        self.path = path
        self._lock = threading.Lock()
        self._file = None
        if path:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
        self._log = logging.getLogger(LOGGER_NAME)

    def __call__(self, who: Identity | None, method: str, request, outcome: str, detail: str) -> None:
        line = json.dumps({
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "who": f"{who.role}/{who.name}" if who else None,
            "method": method.rsplit("/", 1)[-1],
            "target": target_of(method, request) if request is not None else "?",
            "outcome": outcome,
            "detail": detail,
        }, sort_keys=False)
        if self._file is None:
            self._log.info("%s", line)
            return
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
