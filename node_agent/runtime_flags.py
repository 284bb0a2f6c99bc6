"""Which ``python -m meshserve.runtime`` flags an assignment may pass, parsed exactly.

argparse accepts any unambiguous prefix of a flag, so ``--lis`` reached
``--listen`` through the old "is it one of the agent's flags?" guard. Here
each argument must be a flag spelled out in full, from the allowed set, with
a value that its own check accepts: ``--flag VALUE`` or ``--flag=VALUE``,
nothing positional. Guarantees: ``--listen`` and ``--model-repository`` are
never allowed (where a replica listens and what it reads are the agent's to
decide), nor ``--insecure``, any ``--tls-*`` (TLS comes from the agent) or
``--shared-memory`` (the host policy's); ``--model-control`` only when the
host policy says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable

from meshserve.common.errors import MeshError
from meshserve.common.model_names import plain_model_name
from meshserve.common.runtime_options import MODEL_CONTROL_FLAG, MODEL_CONTROL_MODES, SHARED_MEMORY_FLAG

# The agent hands replicas its own TLS settings (node_agent/replica.py): a spec cannot turn TLS off or swap them.
TLS_FROM_THE_AGENT = "TLS settings come from the node agent"

# A model name, HOST:PORT or a number: far shorter. Bounds what a refusal message repeats.
MAX_SHOWN_CHARS = 80


def shown(text: str) -> str:
    """``text`` quoted for a message, control characters escaped, cut to one short line."""
    quoted = repr(text)
    return quoted if len(quoted) <= MAX_SHOWN_CHARS else quoted[:MAX_SHOWN_CHARS - 3] + "..."


def _number(value: str) -> None:
    if not re.fullmatch(r"\d+(\.\d+)?", value):
        raise ValueError("expected a non-negative number")


def _count(value: str) -> None:
    if not value.isdigit():
        raise ValueError("expected a whole number")


def _remote_model(value: str) -> None:
    name, sep, address = value.partition("=")
    host, colon, port = address.rpartition(":")
    if not sep or not colon or not host or not port.isdigit():
        raise ValueError("expected NAME=HOST:PORT")
    plain_model_name(name)


def _model(value: str) -> None:
    plain_model_name(value)


def _one_of(*choices: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
    return check


# Flags a spec may pass, with how each value is checked (None: a switch, no value).
# The scheduler itself passes --model and --remote-model for pipeline replicas.
SAFE_RUNTIME_FLAGS: dict[str, Callable[[str], None] | None] = {
    "--model": _model,
    "--remote-model": _remote_model,
    "--drain-delay": _number,
    "--grace-period": _number,
    "--max-message-bytes": _count,
    "--strict": None,
    "--event-loop": _one_of("uvloop", "asyncio"),
    "--log-level": _one_of("DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"),
}
NEVER_FLAGS = {"--listen": "the agent picks where a replica listens",
               "--model-repository": "the repository comes from model.repository, checked against the roots",
               SHARED_MEMORY_FLAG: "the host policy's shared_memory decides",
               "--insecure": TLS_FROM_THE_AGENT}
# --tls-cert, --tls-key, --tls-ca, --tls-client-*, --tls-require-client-cert (protos/security/tls.py) and
# any other --tls*: a replica serves with the node agent's TLS settings, whatever a spec says.
TLS_FLAG_PREFIX = "--tls"
_MODEL_CONTROL_VALUE = _one_of(*MODEL_CONTROL_MODES)


def never_allowed(flag: str) -> str | None:
    """Why ``flag`` is never allowed in a spec's runtime_args, None if it may be."""
    if flag in NEVER_FLAGS:
        return NEVER_FLAGS[flag]
    if flag.startswith(TLS_FLAG_PREFIX):
        return TLS_FROM_THE_AGENT
    return None


def runtime_arg_problems(args: Iterable[str], allowed: Collection[str], allow_model_control: bool,
                         source: str) -> list[str]:
    """Every problem of ``args`` (empty: all allowed). ``allowed`` is a subset of ``SAFE_RUNTIME_FLAGS``."""
    problems: list[str] = []
    items = list(args)
    index = 0
    while index < len(items):
        item = items[index]
        index += 1
        flag, has_inline, value = item.partition("=")
        if not flag.startswith("--"):
            problems.append(f"runtime argument {shown(item)} is not a flag")
            continue
        never = never_allowed(flag)
        if never:
            name = flag if flag in NEVER_FLAGS else shown(flag)
            problems.append(f"runtime flag {name} is never allowed ({never})")
            continue
        check: Callable[[str], None] | None
        if flag == MODEL_CONTROL_FLAG:
            if not allow_model_control:
                problems.append(f"runtime flag {flag} is not allowed (allow_model_control is off in {source})")
                continue
            check = _MODEL_CONTROL_VALUE
        elif flag in allowed:
            check = SAFE_RUNTIME_FLAGS[flag]
        else:
            problems.append(f"runtime flag {shown(flag)} is not allowed (allowed, spelled out in full: "
                            f"{', '.join(sorted(allowed))})")
            continue
        if check is None:
            if has_inline:
                problems.append(f"runtime flag {flag} takes no value")
            continue
        if not has_inline:
            if index >= len(items):
                problems.append(f"runtime flag {flag} needs a value")
                continue
            value = items[index]
            index += 1
        try:
            check(value)
        except (ValueError, MeshError) as err:
            problems.append(f"runtime flag {flag} {shown(value)}: {getattr(err, 'message', err)}")
    return problems
