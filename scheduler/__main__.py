"""``scheduler`` / ``python -m meshserve.scheduler``: serve | ctl | dev."""

from __future__ import annotations

import argparse
import asyncio
import sys

from meshserve.common.daemon_logging import add_logging_arguments, configure_from_args
from meshserve.common.env_flags import parse_with_environment
from meshserve.common.listen import ListenError, exit_on_listen_error
from meshserve.common.metrics import add_metrics_arguments, metrics_listen_from_args
from meshserve.common.security.auth import add_auth_arguments, authenticator_from_args
from meshserve.common.security.tls import add_tls_arguments, tls_from_args
from meshserve.common.sizes import parse_size

from .artifacts import DEFAULT_ARTIFACT_DIR, DEFAULT_MAX_BUNDLE_BYTES
from .core import DEFAULT_HEARTBEAT_TIMEOUT_S, DEFAULT_REPORT_INTERVAL_S
from .server import SchedulerOptions, serve
from .store import CorruptStore
from .store.etcd_security import add_etcd_arguments, etcd_security_from_args

USAGE = """scheduler serve --listen HOST:PORT --store URL     run a scheduler
scheduler ctl [--server ADDRS] VERB ...                operate the mesh (scheduler ctl --help)
scheduler dev [--listen ADDR] [--state-dir DIR] ...    a single-host mesh in one command"""


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scheduler serve")
    parser.add_argument("--listen", default=SchedulerOptions.listen)
    parser.add_argument("--store", default=SchedulerOptions.store_url,
                        help="sqlite:///path/state.db (one host) or etcd://host:port[,host:port]")
    parser.add_argument("--id", default="", help="this scheduler's name in elections (default host:port)")
    parser.add_argument("--election-ttl", type=int, default=SchedulerOptions.election_ttl_s)
    parser.add_argument("--report-interval", type=float, default=DEFAULT_REPORT_INTERVAL_S)
    parser.add_argument("--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT_S)
    add_logging_arguments(parser)
    parser.add_argument("--artifact-dir", default=DEFAULT_ARTIFACT_DIR, metavar="DIR",
                        help="where uploaded model bundles are kept by content digest (shared by every "
                             f"scheduler of an election); default {DEFAULT_ARTIFACT_DIR}")
    parser.add_argument("--max-artifact-size", type=parse_size, default=DEFAULT_MAX_BUNDLE_BYTES, metavar="SIZE",
                        help="the largest bundle an upload may send (e.g. 64GiB, the default)")
    add_tls_arguments(parser)
    add_auth_arguments(parser, data_plane=False)
    parser.add_argument("--audit-log", metavar="FILE",
                        help="append one JSON line per mutating admin call (allowed or refused) to FILE; "
                             "default: the log, at INFO under logger meshserve.audit")
    add_etcd_arguments(parser)
    add_metrics_arguments(parser)
    args = parse_with_environment(parser, "scheduler", argv)   # MESHSERVE_SCHEDULER_<FLAG>, then argv
    metrics_listen = metrics_listen_from_args(parser, args)
    tls = tls_from_args(parser, args, args.listen)
    auth = authenticator_from_args(parser, args, tls)
    try:
        etcd_security = etcd_security_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    configure_from_args(args)
    options = SchedulerOptions(artifact_dir=args.artifact_dir, max_artifact_bytes=args.max_artifact_size,
                               listen=args.listen, store_url=args.store, scheduler_id=args.id,
                               election_ttl_s=args.election_ttl, report_interval_s=args.report_interval,
                               heartbeat_timeout_s=args.heartbeat_timeout, tls=tls, etcd_security=etcd_security,
                               auth=auth, audit_log=args.audit_log, metrics_listen=metrics_listen)
    try:
        asyncio.run(serve(options))
    except CorruptStore as exc:
        print(f"scheduler serve: {exc}", file=sys.stderr, flush=True)
        return 1
    except ListenError as err:
        exit_on_listen_error("meshserve scheduler", err)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return _serve(rest)
    if command == "ctl":
        from .ctl import main as ctl_main

        return ctl_main(rest)
    if command == "dev":
        from .dev import main as dev_main

        return dev_main(rest)
    print(f"scheduler: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
