"""One logging set-up for every daemon: ``--log-level``, ``--log-format text|json``, and journald.

Guarantees:
- ``text`` (the default) is one line per record: ``TIME LEVEL LOGGER: MESSAGE``,
  a traceback following on its own lines. Under journald (``JOURNAL_STREAM``
  names this process's stderr, as systemd sets it) the time is left out:
  journald stamps every line itself. A child whose stderr is a pipe (a
  replica under the node agent) inherits the variable but keeps its times.
- ``json`` is one JSON object per line for log shippers: ``time`` (ISO 8601,
  UTC), ``level``, ``logger``, ``message``, and ``exception`` (the formatted
  traceback) when there is one. Always with its own time, under journald too.
- A bad level or format is refused by argparse with the choices, never a
  traceback.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from collections.abc import Mapping

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
ENV_JOURNAL_STREAM = "JOURNAL_STREAM"


def _level(text: str) -> str:
    level = text.upper()
    if level not in LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level; use one of {', '.join(LEVELS)}")
    return level


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", type=_level, default="INFO", metavar="LEVEL",
                        help=f"{', '.join(LEVELS)} (default INFO)")
    parser.add_argument("--log-format", choices=FORMATS, default="text",
                        help="text (default; without times under journald, which adds its own) or json "
                             "(one object per line, for log shippers)")


def under_journald(env: Mapping[str, str] | None = None, stream=None) -> bool:
    """Whether ``stream`` (stderr) is the journal stream systemd named in ``JOURNAL_STREAM`` ("DEV:INODE")."""
    env = os.environ if env is None else env
    value = env.get(ENV_JOURNAL_STREAM, "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        stat = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


class JsonFormatter(logging.Formatter):
    """One JSON object per record. Hand-written: ten lines, where a package would add a dependency to each daemon."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter(log_format: str, journald: bool) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter("%(levelname)s %(name)s: %(message)s" if journald
                             else "%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure_logging(level: str = "INFO", log_format: str = "text", env: Mapping[str, str] | None = None) -> None:
    """Replace the root logger's handlers with one on stderr in ``log_format`` at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, under_journald(env)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def configure_from_args(args: argparse.Namespace) -> None:
    configure_logging(args.log_level, args.log_format)
