"""``python -m meshserve.runtime``: serve a model repository standalone, like tritonserver."""

from __future__ import annotations

import argparse
import asyncio
import logging

from meshserve.common.listen import ListenError, exit_on_listen_error
from meshserve.common.metrics import add_metrics_arguments, metrics_listen_from_args
from meshserve.common.security.auth import add_auth_arguments, authenticator_from_args, data_plane_table_from_args
from meshserve.common.security.tls import add_tls_arguments, tls_from_args
from meshserve.common.telemetry import configure_tracing, shutdown_tracing

from .ensemble_remote import parse_remote_model
from .model_control import FLAG as MODEL_CONTROL_FLAG
from .model_control import MODES as MODEL_CONTROL_MODES
from .server import ServerOptions, run
from .shared_memory import FLAG as SHARED_MEMORY_FLAG
from .shared_memory import MODES as SHARED_MEMORY_MODES

SERVICE_NAME = "meshserve-runtime"  # OpenTelemetry service.name unless OTEL_SERVICE_NAME says otherwise


def parse_args(argv=None) -> tuple[str, ServerOptions]:
    parser = argparse.ArgumentParser(prog="python -m meshserve.runtime", description=__doc__, allow_abbrev=False)
    parser.add_argument("--model-repository", required=True, help="folder of <model>/config.pbtxt")
    parser.add_argument("--model", action="append", dest="models",
                        help="load only this model (repeatable); default: every model in the repository")
    parser.add_argument("--listen", default=ServerOptions.listen, help="HOST:PORT (port 0 picks a free one)")
    parser.add_argument("--max-message-bytes", type=int, default=ServerOptions.max_message_bytes)
    parser.add_argument("--grace-period", type=float, default=ServerOptions.grace_period_s,
                        help="seconds in-flight requests get to finish on SIGTERM")
    parser.add_argument("--drain-delay", type=float, default=ServerOptions.drain_delay_s,
                        help="seconds to keep serving while reporting NOT_SERVING before stopping")
    parser.add_argument("--remote-model", action="append", default=[], metavar="NAME=HOST:PORT",
                        help="ensemble step model NAME is served by the replica at HOST:PORT; "
                             "call it over gRPC instead of loading it (repeatable)")
    parser.add_argument("--strict", action="store_true", help="exit if any model fails to load")
    parser.add_argument(MODEL_CONTROL_FLAG, choices=MODEL_CONTROL_MODES, default=ServerOptions.model_control,
                        help="explicit: allow RepositoryModelLoad/Unload (only of the --model names when given); "
                             "none (default): refuse them")
    parser.add_argument(SHARED_MEMORY_FLAG, choices=SHARED_MEMORY_MODES, default=ServerOptions.shared_memory,
                        help="system (default): serve system shared memory to clients on this host, each "
                             "client seeing only its own regions; none: refuse every registration")
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="uvloop serves ~10%% more requests per second (bench/replica.py)")
    parser.add_argument("--log-level", default="INFO")
    add_tls_arguments(parser)
    add_auth_arguments(parser, data_plane=True)
    add_metrics_arguments(parser)
    args = parser.parse_args(argv)
    metrics_listen = metrics_listen_from_args(parser, args)
    tls = tls_from_args(parser, args, args.listen)
    auth, roles = authenticator_from_args(parser, args, tls), data_plane_table_from_args(parser, args)
    remote_models = {}
    for text in args.remote_model:
        try:
            name, address = parse_remote_model(text)
        except ValueError as err:
            parser.error(str(err))
        remote_models[name] = address
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.event_loop, ServerOptions(
        repository=args.model_repository, models=args.models, listen=args.listen,
        max_message_bytes=args.max_message_bytes, grace_period_s=args.grace_period,
        drain_delay_s=args.drain_delay, strict=args.strict, remote_models=remote_models, tls=tls,
        model_control=args.model_control, auth=auth, roles=roles, shared_memory=args.shared_memory,
        metrics_listen=metrics_listen,
    )


def main(argv=None) -> None:
    """Serve until SIGTERM/SIGINT. Tracing follows the OTEL_* environment (runtime/telemetry.py)."""
    event_loop, options = parse_args(argv)
    provider = configure_tracing(SERVICE_NAME)
    try:
        if event_loop == "uvloop":
            import uvloop

            uvloop.run(run(options))
        else:
            asyncio.run(run(options))
    except ListenError as err:
        exit_on_listen_error("meshserve runtime", err)
    finally:
        shutdown_tracing(provider)  # flush the spans of the last requests


if __name__ == "__main__":
    main()
