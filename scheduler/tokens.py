"""``scheduler ctl tokens create --role ROLE --name NAME [--out FILE]``: a new bearer token.

Prints the token file line (``sha256:<hex> ROLE NAME``) for the servers'
``--token-file``, and the token itself: on stdout's first line, or written
to ``--out`` (created 0600, never overwritten) for a client's
``--token-file``. Nothing is stored anywhere else: a lost token is replaced,
not recovered.
"""

from __future__ import annotations

import argparse
import os
import sys

from meshserve.common.security.identity import ROLES
from meshserve.common.security.tokens import new_token, token_line


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scheduler ctl tokens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    create = verbs.add_parser("create", help="create a token; print its token file line")
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--name", required=True, help="who holds it (letters, digits, '.', '_', '-')")
    create.add_argument("--out", metavar="FILE", help="write the token here (0600) instead of printing it")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    token = new_token()
    try:
        line = token_line(token, args.role, args.name)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        try:
            fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as err:
            print(f"error: --out {args.out}: {err.strerror}", file=sys.stderr)
            return 1
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
        print(line)
        print(f"token written to {args.out}; add the line above to each server's --token-file", file=sys.stderr)
        return 0
    print(token)
    print(line)
    print("line 1: the token (give it to its holder: --token-file or $MESHSERVE_TOKEN); "
          "line 2: add it to each server's --token-file", file=sys.stderr)
    return 0
