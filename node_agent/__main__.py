"""``node-agent`` / ``python -m meshserve.node_agent``: run this host's agent.

    node-agent --scheduler HOST:PORT[,HOST:PORT] --name NAME [--fake-gpus 2x80GiB]
               [--labels k=v,k2=v2] [--host 127.0.0.1] [--report-interval 1.0]
               [--policy /etc/meshserve/policy.yaml] [--isolation auto|systemd|rlimit|none]

Every assignment is checked against this host's execution policy
(node_agent/policy.py; README "Security"): without --policy no model
repository is allowed, so nothing runs. A refused assignment is reported as a
failed replica with the reason.

The cluster this node joins (the first scheduler's cluster id) is remembered
in ``--state-dir``/node-NAME.json; a scheduler of another cluster (an empty or
wrong store) is refused and the replicas keep running (membership.py).

SIGTERM or SIGINT drains every replica (each gets SIGTERM, then SIGKILL
after --stop-grace), reports their stop, and exits 0. Without --fake-gpus the
agent reads NVML; on a host with no GPU or driver it runs CPU-only and says
so (gpu_source "none") — it never fakes GPUs unasked.

Each replica runs under the memory and CPU its deployment booked
(``--isolation``, node_agent/isolation.py): a systemd scope with MemoryMax and
CPUQuota where systemd runs, else RLIMIT_DATA; ``--isolation systemd`` on a
host without a working systemd refuses to start, saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from meshserve.common.daemon_logging import add_logging_arguments, configure_from_args
from meshserve.common.env_flags import parse_with_environment
from meshserve.common.listen import ListenError, exit_on_listen_error
from meshserve.common.metrics import add_metrics_arguments, metrics_listen_from_args
from meshserve.common.metrics_http import MetricsHttpServer
from meshserve.common.ready_line import metrics_detail
from meshserve.common.sd_notify import Notifier, announce, draining
from meshserve.common.security.tls import add_tls_arguments, tls_from_args
from meshserve.common.security.tokens import ENV_TOKEN, TokenError, client_token
from meshserve.common.sizes import parse_size

from .agent import Agent, AgentConfig
from .artifact_cache import ArtifactCache
from .artifact_fetchers import artifact_fetchers
from .gpu_probe import parse_fake_spec, select_probe
from .isolation import MODES, IsolationUnavailable, choose_isolation
from .membership import MembershipUnreadable
from .metrics import AgentMetrics
from .policy import HostPolicy, PolicyError
from .process import SubprocessLauncher
from .replica import ReplicaOptions
from .replica_logs import ReplicaLogs
from .status_line import agent_status, draining_status
from .supervisor import Supervisor

log = logging.getLogger("node_agent")

# Beside the scheduler's default store (sqlite:///var/lib/meshserve/state.db).
DEFAULT_STATE_DIR = "/var/lib/meshserve/node-agent"
DEFAULT_CACHE_BYTES = 100 << 30


def _labels(text: str) -> dict[str, str]:
    labels = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"bad label {part!r}: expected KEY=VALUE")
        labels[key.strip()] = value.strip()
    return labels


def _schedulers(text: str) -> list[str]:
    addresses = [p.strip() for p in text.split(",") if p.strip()]
    for address in addresses:
        if ":" not in address:
            raise argparse.ArgumentTypeError(f"bad scheduler address {address!r}: expected HOST:PORT")
    if not addresses:
        raise argparse.ArgumentTypeError("no scheduler address")
    return addresses


def _fake_spec(text: str) -> str:
    try:
        parse_fake_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="node-agent", description="meshserve node agent: one per GPU host.")
    parser.add_argument("--scheduler", required=True, type=_schedulers,
                        help="HOST:PORT[,HOST:PORT...]: tried in turn; a standby's named leader is followed")
    parser.add_argument("--name", default=socket.gethostname(), help="node name (default: the host name)")
    parser.add_argument("--fake-gpus", type=_fake_spec, metavar="SPEC",
                        help="fake GPUs instead of NVML, e.g. 2x80GiB or 1x24GiB,2x80GiB (reported as fake)")
    parser.add_argument("--labels", type=_labels, default={}, help="k=v,k2=v2")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address replicas are reached at (and bound to, unless --bind-host)")
    parser.add_argument("--bind-host", help="address replicas bind to, e.g. 0.0.0.0 (default: --host)")
    parser.add_argument("--report-interval", type=_positive, default=1.0,
                        help="seconds between usage reports until the scheduler sets its own")
    parser.add_argument("--stop-grace", type=_positive, default=ReplicaOptions.stop_grace_s,
                        help="seconds a draining replica gets before SIGKILL")
    parser.add_argument("--startup-timeout", type=_positive, default=ReplicaOptions.startup_timeout_s,
                        help="seconds a replica gets to become SERVING before it is killed and restarted")
    parser.add_argument("--max-failed-starts", type=_at_least_one, default=ReplicaOptions.max_failed_starts,
                        help="starts in a row that end before ready, after which a replica stays failed until "
                             "its deployment's revision changes (default: %(default)s)")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                        help="where the agent remembers the cluster it joined and keeps each replica's output "
                             "(replicas/REPLICA.log, rotated) (default: %(default)s)")
    parser.add_argument("--artifact-cache", metavar="DIR",
                        help="where fetched models are cached by content digest (default: STATE_DIR/artifacts)")
    parser.add_argument("--artifact-cache-size", type=_size, default=DEFAULT_CACHE_BYTES, metavar="SIZE",
                        help="the cache's bound: unused models are evicted, least recently used first "
                             "(default 100GiB)")
    parser.add_argument("--policy", metavar="FILE",
                        help="this host's execution policy (YAML): repository roots, allowed env and runtime "
                             "flags, run_as user, caps; default: nothing is allowed to run")
    add_logging_arguments(parser)
    parser.add_argument("--isolation", choices=MODES, default="auto",
                        help="how each replica is held to its booked memory and CPU: a systemd scope (MemoryMax, "
                             "CPUQuota), rlimit (RLIMIT_DATA only), none; auto: systemd where systemd-run --scope "
                             "works, else rlimit (default: %(default)s)")
    add_tls_arguments(parser)
    add_metrics_arguments(parser)
    parser.add_argument("--token-file", metavar="FILE",
                        help=f"a file holding this node's bearer token for the scheduler (role agent, NAME the "
                             f"node name; default ${ENV_TOKEN}); with mutual TLS its certificate is enough")
    args = parse_with_environment(parser, "node-agent", argv)   # MESHSERVE_NODE_AGENT_<FLAG>, then argv
    args.metrics_listen = metrics_listen_from_args(parser, args)
    try:
        args.token = client_token(args.token_file)
    except TokenError as err:
        parser.error(str(err))
    # Replicas listen on --bind-host (else --host) with these settings: plaintext only on loopback.
    args.tls = tls_from_args(parser, args, f"{args.bind_host or args.host}:0")
    return args


async def _registered(agent: Agent) -> str:
    """Registered with a scheduler, which re-adopted what this node runs (systemd's READY)."""
    await agent.wait_connected(timeout=None)
    return f"registered with scheduler {agent.connected_to}"


def load_policy(path: str | None) -> HostPolicy:
    """The policy file's, or the defaults; exits 2 naming the problem in a bad file."""
    try:
        policy = HostPolicy.load(path) if path else HostPolicy()
    except PolicyError as err:
        raise SystemExit(f"node-agent: {err}") from None
    log.info("host policy from %s: repository roots %s; replicas run as %s", policy.source,
             ", ".join(map(str, policy.repository_roots)) or "none (nothing can run)",
             policy.run_as.name if policy.run_as else "the agent's user")
    if policy.replicas_run_as_root() and policy.allow_root:
        log.warning("replicas run as root (allow_root: true in %s): for development hosts only", policy.source)
    return policy


async def run(args: argparse.Namespace, policy: HostPolicy) -> None:
    run_as = policy.run_as
    try:
        isolation = await choose_isolation(args.isolation, run_as_uid=run_as.uid if run_as else None,
                                           run_as_gid=run_as.gid if run_as else None)
    except IsolationUnavailable as err:
        raise SystemExit(f"node-agent: {err}") from None
    probe = await asyncio.to_thread(select_probe, args.fake_gpus, seed=args.name)
    agent_ref: list[Agent] = []

    def scheduler_now() -> str:   # the scheduler this agent is connected to (it holds the uploads)
        return (agent_ref[0].connected_to if agent_ref else None) or args.scheduler[0]

    cache = ArtifactCache(args.artifact_cache or os.path.join(args.state_dir, "artifacts"), args.artifact_cache_size,
                          artifact_fetchers(scheduler_now, args.tls, args.token, args.artifact_cache_size))
    options = ReplicaOptions(listen_host=args.bind_host or args.host,
                             advertise_host=args.host if args.bind_host else None,
                             stop_grace_s=args.stop_grace, startup_timeout_s=args.startup_timeout, policy=policy,
                             tls=args.tls, metrics=args.metrics_listen is not None,
                             logs=ReplicaLogs(os.path.join(args.state_dir, "replicas")),
                             max_failed_starts=args.max_failed_starts, artifacts=cache, isolation=isolation)
    switches_user = getattr(isolation, "switches_user", False)   # inside the scope, not in the launcher
    supervisor = Supervisor(options, launcher=SubprocessLauncher(run_as=run_as, switch_user=not switches_user))
    metrics_server = None
    if args.metrics_listen:   # replicas then serve metrics on loopback, re-exported here (node_agent/metrics.py)
        metrics_server = MetricsHttpServer(args.metrics_listen, AgentMetrics(args.name, probe, supervisor).render)
        await metrics_server.start()
        print(f"meshserve node-agent {args.name}{metrics_detail(metrics_server.address)}", flush=True)
    agent = Agent(AgentConfig(node_name=args.name, schedulers=args.scheduler, host=args.host,
                              labels=args.labels, report_interval_s=args.report_interval, tls=args.tls, token=args.token,
                              membership_file=os.path.join(args.state_dir, f"node-{args.name}.json")),
                  probe, supervisor)
    agent_ref.append(agent)
    loop = asyncio.get_running_loop()
    shutdown: list[asyncio.Task] = []
    notifier = Notifier()
    systemd = asyncio.create_task(announce(notifier, _registered(agent), lambda: agent_status(agent)),
                                  name="systemd")

    async def drain() -> None:
        # STOPPING, then STATUS and EXTEND_TIMEOUT_USEC while replicas drain (each within --stop-grace).
        async with draining(notifier, lambda: draining_status(agent)):
            await agent.shutdown()

    def on_signal(signum: int) -> None:
        if not shutdown:
            log.info("%s: draining replicas, then exiting", signal.Signals(signum).name)
            systemd.cancel()
            shutdown.append(asyncio.ensure_future(drain()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    pruner = asyncio.create_task(_prune_replica_logs(options.logs, supervisor), name="replica log retention")
    try:
        await agent.run()
        if shutdown:
            await shutdown[0]
    finally:
        pruner.cancel()
        await supervisor.drain_all()  # a no-op after shutdown(); otherwise never leave replicas behind
        if metrics_server:
            await metrics_server.stop()
        probe.close()
    log.info("stopped")


# How often old replicas' log files are looked for (replica_logs.py: kept 7 days after their last line).
PRUNE_INTERVAL_S = 3600.0


async def _prune_replica_logs(logs: ReplicaLogs | None, supervisor: Supervisor) -> None:
    while logs is not None:
        try:
            removed = await logs.prune({status.replica_id for status in supervisor.statuses()})
            if removed:
                log.info("removed the log files of %d replica(s) gone for a week", len(removed))
        except OSError as err:
            log.warning("replica log retention: %s", err)
        await asyncio.sleep(PRUNE_INTERVAL_S)


def main(argv=None) -> None:
    args = parse_args(argv)
    configure_from_args(args)
    try:
        asyncio.run(run(args, load_policy(args.policy)))
    except MembershipUnreadable as err:
        print(f"node-agent: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except ListenError as err:
        exit_on_listen_error("meshserve node-agent", err)


if __name__ == "__main__":
    main()
