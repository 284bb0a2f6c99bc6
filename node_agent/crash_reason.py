"""Why a replica process died, in one line an operator can act on.

``crash_reason(lines)`` reads the last lines a process printed (stdout and
stderr together, oldest first) and returns the last meaningful error line:

- after a Python traceback, the exception line (``ValueError: boom``), not
  ``Traceback (most recent call last):`` nor a frame; for chained exceptions,
  the last one raised;
- without a traceback, the last line that names an error or is fatal
  (``error``, ``fatal``, ``exception``, ``killed``, ...), else the last
  non-blank line.

Guarantees: the result is one line, at most ``REASON_CHARS`` characters (cut
with an ellipsis, never to nothing), and empty only when every line is blank.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

REASON_CHARS = 300

_TRACEBACK = "Traceback (most recent call last):"
# An exception line as Python prints it: a (dotted) class name, then ':' or the end of the line.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning|Failure|Fault)\b(:.*)?$")
_ERROR_WORDS = re.compile(r"\b(error|fatal|exception|failed|killed|abort(ed)?|panic|segmentation fault)\b",
                          re.IGNORECASE)
# Separators between chained tracebacks and the caret lines under a frame.
_NOISE = re.compile(r"^(\s*[\^~]+\s*$|During handling of the above exception|The above exception was the direct)")


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def _after_traceback(lines: Sequence[str], start: int) -> str | None:
    """The exception line that ends the traceback starting at ``lines[start]``: the first line after it that
    is not indented (frames and source lines are)."""
    for line in lines[start + 1:]:
        if not line.strip() or line[:1].isspace() or _NOISE.match(line):
            continue
        return line
    return None


def crash_reason(lines: Sequence[str]) -> str:
    """The last meaningful error line of ``lines`` (see the module docstring); "" when all are blank."""
    starts = [index for index, line in enumerate(lines) if line.strip() == _TRACEBACK]
    for start in reversed(starts):   # the last traceback whose exception line was not cut off
        found = _after_traceback(lines, start)
        if found is not None:
            return _one_line(found)
    meaningful = [line for line in lines if line.strip() and not _NOISE.match(line)]
    for line in reversed(meaningful):
        if _EXCEPTION_LINE.match(line.strip()):
            return _one_line(line)
    for line in reversed(meaningful):
        if _ERROR_WORDS.search(line) and not line[:1].isspace():
            return _one_line(line)
    return _one_line(meaningful[-1]) if meaningful else ""
