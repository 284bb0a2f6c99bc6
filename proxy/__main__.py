"""``mesh-proxy`` / ``python -m meshserve.proxy``: the mesh's front door.

Serves ``inference.GRPCInferenceService`` on ``--listen`` and forwards each
call to a replica from the route table of ``--scheduler`` (or a static
``--routes-file``, a ``mesh.RouteTable`` in protobuf text format). Prints
"meshserve proxy listening on HOST:PORT" once serving; SIGTERM/SIGINT stop
it, letting calls in flight finish for ``--grace-period`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio

from google.protobuf import text_format

from meshserve.common.daemon_logging import add_logging_arguments, configure_from_args
from meshserve.common.env_flags import parse_with_environment
from meshserve.common.listen import ListenError, exit_on_listen_error
from meshserve.common.metrics import add_metrics_arguments, metrics_listen_from_args
from meshserve.common.ready_line import metrics_detail, print_ready_line_until_signalled
from meshserve.common.sd_notify import Notifier, announce, draining
from meshserve.common.security.auth import add_auth_arguments, authenticator_from_args, data_plane_table_from_args
from meshserve.common.security.tls import add_tls_arguments, tls_from_args
from meshserve.common.security.tokens import ENV_TOKEN, TokenError, client_token
from meshserve.common.telemetry import configure_tracing, shutdown_tracing
from meshserve.protos.mesh import control_pb2 as mesh

from .routes import RouteTable
from .server import ProxyOptions, ProxyServer


def parse_args(argv=None) -> tuple[argparse.Namespace, ProxyOptions]:
    parser = argparse.ArgumentParser(prog="mesh-proxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--scheduler", help="HOST:PORT[,HOST:PORT...]: schedulers to follow routes from")
    source.add_argument("--routes-file", help="a static mesh.RouteTable in protobuf text format")
    parser.add_argument("--listen", default=ProxyOptions.listen, help="HOST:PORT (port 0 picks a free one)")
    add_metrics_arguments(parser)
    parser.add_argument("--max-message-bytes", type=int, default=ProxyOptions.max_message_bytes)
    parser.add_argument("--max-retries", type=int, default=ProxyOptions.max_retries,
                        help="retries per call of one that never reached a model")
    parser.add_argument("--channels-per-replica", type=int, default=ProxyOptions.channels_per_replica,
                        help="HTTP/2 connections to each replica (measured: 1 is as fast as 4 for small calls)")
    parser.add_argument("--cold-start-timeout", type=float, default=ProxyOptions.cold_start_timeout_s, metavar="S",
                        help="how long a call for a model scaled to zero waits for a replica (default %(default)s)")
    parser.add_argument("--max-held-calls", type=int, default=ProxyOptions.max_held_calls,
                        help="calls held at once for models scaled to zero; more fail UNAVAILABLE "
                             "(default %(default)s)")
    parser.add_argument("--grace-period", type=float, default=5.0,
                        help="seconds calls in flight get to finish on SIGTERM")
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop")
    add_logging_arguments(parser)
    add_tls_arguments(parser)
    add_auth_arguments(parser, data_plane=True)
    parser.add_argument("--client-token-file", metavar="FILE",
                        help=f"a file holding the bearer token this proxy presents to the schedulers "
                             f"(default ${ENV_TOKEN}); with mutual TLS its certificate is enough")
    args = parse_with_environment(parser, "proxy", argv)   # MESHSERVE_PROXY_<FLAG>, then argv
    tls = tls_from_args(parser, args, args.listen)
    metrics_listen = metrics_listen_from_args(parser, args)
    auth, roles = authenticator_from_args(parser, args, tls), data_plane_table_from_args(parser, args)
    try:
        token = client_token(args.client_token_file)
    except TokenError as err:
        parser.error(str(err))
    configure_from_args(args)
    routes = None
    if args.routes_file:
        with open(args.routes_file, encoding="utf-8") as f:
            routes = RouteTable.from_proto(text_format.Parse(f.read(), mesh.RouteTable()))
    schedulers = [a.strip() for a in (args.scheduler or "").split(",") if a.strip()]
    if args.cold_start_timeout <= 0 or args.max_held_calls < 0:
        parser.error("--cold-start-timeout must be > 0 and --max-held-calls >= 0")
    return args, ProxyOptions(
        schedulers=schedulers, listen=args.listen, metrics_listen=metrics_listen,
        max_message_bytes=args.max_message_bytes, routes=routes, max_retries=args.max_retries, tls=tls,
        auth=auth, roles=roles, client_token=token,
        channels_per_replica=args.channels_per_replica,
        cold_start_timeout_s=args.cold_start_timeout, max_held_calls=args.max_held_calls,
    )


async def run(options: ProxyOptions, grace_period_s: float) -> None:
    server = ProxyServer(options)
    await server.start()
    stop = print_ready_line_until_signalled("proxy", server.address, metrics_detail(server.metrics_address))
    notifier = Notifier()
    systemd = asyncio.create_task(announce(notifier, _routes_received(server), lambda: _status(server)),
                                  name="systemd")
    await stop.wait()
    systemd.cancel()
    # STOPPING, then STATUS and EXTEND_TIMEOUT_USEC while calls in flight finish (within --grace-period).
    async with draining(notifier, lambda: f"draining: calls in flight get up to {grace_period_s:g}s"):
        await server.stop(grace_period_s)


async def _routes_received(server: ProxyServer) -> str:
    """Ready to serve: a route table is in force (systemd's READY)."""
    await server.wait_for_routes()
    version = server.routes.version if server.routes is not None else 0   # set once routes arrived
    return f"serving on {server.address}; route table version {version}"


def _status(server: ProxyServer) -> str:
    """systemd's STATUS while serving: the address and the route table in force."""
    table = server.routes
    if table is None:
        return f"serving on {server.address}; no route table yet"
    endpoints = len({endpoint.address for route in table.routes for endpoint in route.endpoints})
    return (f"serving on {server.address}; route table version {table.version}: {len(table.routes)} route(s), "
            f"{endpoints} endpoint(s)")


def main(argv=None) -> None:
    args, options = parse_args(argv)
    provider = configure_tracing("meshserve-proxy")  # only when the OTEL_* environment asks for it
    try:
        if args.event_loop == "uvloop":
            import uvloop

            uvloop.run(run(options, args.grace_period))
        else:
            asyncio.run(run(options, args.grace_period))
    except ListenError as err:
        exit_on_listen_error("meshserve proxy", err)
    finally:
        shutdown_tracing(provider)


if __name__ == "__main__":
    main()
