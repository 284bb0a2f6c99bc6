"""Every command-line flag of a daemon can come from the environment: ``MESHSERVE_<DAEMON>_<FLAG>``.

``--fake-gpus 2x80GiB`` of the node agent is ``MESHSERVE_NODE_AGENT_FAKE_GPUS=2x80GiB``;
``--strict`` of the runtime is ``MESHSERVE_RUNTIME_STRICT=true``. Under systemd the
variables come from ``/etc/meshserve/DAEMON.env`` (the units' ``EnvironmentFile``),
one ``KEY=VALUE`` a line: the configuration file of each daemon.

Guarantees:
- The environment's values go through the parser exactly as flags do (types,
  choices, required flags), placed before the command line's own flags: a
  flag given on the command line wins (for a repeatable flag, both count).
- A variable with the daemon's prefix that names no flag is refused with a
  message naming it and the closest flags (a typo never passes silently).
- A switch (``store_true``) takes true/false, yes/no, on/off, 1/0; anything
  else is refused. A repeatable flag takes several values separated by
  whitespace, with shell quoting (``shlex``): ``"a b" c`` is two values.
- The daemon's prefix is its own, so one daemon's settings never configure
  another: a replica started by the node agent does not read the agent's.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import sys
from collections.abc import Mapping, Sequence

PREFIX = "MESHSERVE_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_prefix(daemon: str) -> str:
    """``node-agent`` -> ``MESHSERVE_NODE_AGENT_``."""
    return PREFIX + daemon.upper().replace("-", "_") + "_"


def env_name(daemon: str, flag: str) -> str:
    """``("node-agent", "--fake-gpus")`` -> ``MESHSERVE_NODE_AGENT_FAKE_GPUS``."""
    return env_prefix(daemon) + flag.lstrip("-").upper().replace("-", "_")


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long option -> its action, for every optional argument but --help."""
    flags = {}
    for action in parser._actions:   # argparse has no public list of its actions
        if isinstance(action, argparse._HelpAction):
            continue
        for option in action.option_strings:
            if option.startswith("--"):
                flags[option] = action
                break
    return flags


def environment_arguments(parser: argparse.ArgumentParser, daemon: str,
                          env: Mapping[str, str] | None = None) -> list[str]:
    """The command-line words the environment's ``MESHSERVE_<DAEMON>_*`` variables stand for.

    Calls ``parser.error`` (exit 2, with a message) for an unknown variable or an unreadable switch."""
    env = os.environ if env is None else env
    prefix = env_prefix(daemon)
    by_name = {env_name(daemon, flag): (flag, action) for flag, action in _flags(parser).items()}
    words: list[str] = []
    for key in sorted(key for key in env if key.startswith(prefix)):
        value = env[key]
        if key not in by_name:
            close = difflib.get_close_matches(key, list(by_name), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; each --flag is {prefix}FLAG"
            parser.error(f"unknown setting {key} in the environment (or /etc/meshserve/{daemon}.env){hint}")
        flag, action = by_name[key]
        if action.nargs == 0:      # a switch: store_true, store_false, store_const, count
            word = value.strip().lower()
            if word not in _TRUE | _FALSE:
                parser.error(f"{key}={value[:80]!r}: use true or false")
            if word in _TRUE:
                words.append(flag)
            continue
        if isinstance(action, argparse._AppendAction):
            try:
                values = shlex.split(value)
            except ValueError as err:
                parser.error(f"{key}: {err}")
            for item in values:
                words += [flag, item]
            continue
        words.append(f"{flag}={value}")   # "=": a value starting with "-" stays a value
    return words


def parse_with_environment(parser: argparse.ArgumentParser, daemon: str, argv: Sequence[str] | None = None,
                           env: Mapping[str, str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` of the environment's flags followed by ``argv`` (default ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return parser.parse_args([*environment_arguments(parser, daemon, env), *argv])
