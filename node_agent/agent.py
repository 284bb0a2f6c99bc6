"""The agent's connection to the scheduler: register, report, apply assignments, fail over.

One ``AgentService.Connect`` stream at a time. Guarantees:

- The first message on every stream is a Register carrying the replicas
  still running, so a scheduler that sees the agent again adopts them
  instead of placing duplicates. Then a UsageReport every report interval
  (the scheduler's ``Registered.report_interval_ms`` when it gives one);
  ``sequence`` increases across reconnects.
- A stream that breaks, by error or by the scheduler closing it, leaves the
  replicas running; the agent reconnects with backoff, forever, until
  stopped. The data plane never waits on the control plane.
- ``--scheduler a,b,c``: each is tried in turn until one answers Registered.
  One that refuses (FAILED_PRECONDITION or UNAVAILABLE, a standby) and names
  the leader — in trailing metadata ``leader-address``, or as the first
  HOST:PORT after the word "leader" in its message (the scheduler's
  "... the leader is ID at HOST:PORT") — is followed to that leader first.
- Assignments are applied as they come, each one the complete set (level-
  triggered): the supervisor converges on the latest.
- A report that cannot be written within the heartbeat timeout ends the
  stream, and the channel pings the scheduler (gRPC keepalive, every
  ``KEEPALIVE_TIME_MS``, answered within ``KEEPALIVE_TIMEOUT_MS``): a
  scheduler that went away without closing the connection (a paused
  process, a partition) is noticed within seconds, without relying on TCP
  timeouts, and the agent moves on to another scheduler first.
- A stream the scheduler ends with a refusal naming the leader (it stepped
  down) is followed to that leader at once.
- Reconnect delays are jittered and capped at ``RECONNECT_BACKOFF.max_s``,
  below the scheduler's heartbeat timeout and well below a new leader's
  lost-node grace (scheduler/core.py), so a restarted scheduler hears from
  every agent before it would declare any node lost, and agents do not all
  retry at the same instants.
- A scheduler whose cluster id differs from the one this node joined
  (membership.py: an empty or wrong store) is refused before any of its
  assignments is applied: replicas keep running, the agent logs the error
  and keeps retrying.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from meshserve.common.backoff import Backoff
from meshserve.common.leader import leader_named
from meshserve.common.security.tls import TlsConfig, aio_channel
from meshserve.common.security.tokens import aio_token_interceptors
from meshserve.protos.mesh import control_pb2 as pb
from meshserve.protos.mesh import control_pb2_grpc as pb_grpc

from . import __version__, messages
from .gpu_probe import SOURCE_FAKE, SOURCE_NONE, GpuProbe
from .host import read_host_resources
from .log_requests import LogRequests
from .membership import ClusterMembership, ForeignCluster
from .replica import STOPPED
from .supervisor import Supervisor

log = logging.getLogger(__name__)

# Ping the scheduler every KEEPALIVE_TIME_MS and give up on it when a ping is
# not answered within KEEPALIVE_TIMEOUT_MS: a silent scheduler (paused,
# partitioned) is left within about 5 s, about one heartbeat timeout and far
# less than a new leader's grace. The scheduler allows pings this often
# (scheduler/server.py SERVER_OPTIONS). gRPC 1.85 times keepalive pings with
# grpc.http2.ping_timeout_ms (default 60 s), not grpc.keepalive_timeout_ms
# alone: both are set.
KEEPALIVE_TIME_MS = 2_000
KEEPALIVE_TIMEOUT_MS = 3_000
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# 0.2 s, 0.4 s, ... at most 2 s between rounds, each shortened by up to half at
# random. 2 s is below the default heartbeat timeout (5 s) and far below a new
# leader's grace (3 heartbeat timeouts), and costs a dead scheduler's host little.
RECONNECT_BACKOFF = Backoff(initial_s=0.2, max_s=2.0, jitter=0.5)


@dataclass
class AgentConfig:
    node_name: str
    schedulers: Sequence[str]
    host: str = "127.0.0.1"                     # where this node's replicas are reached
    labels: dict[str, str] = field(default_factory=dict)
    report_interval_s: float = 1.0              # until the scheduler says otherwise
    # A scheduler that has not answered Registered by then is treated as refusing.
    register_timeout_s: float = 5.0
    # Used when the scheduler gives no heartbeat timeout: a report stuck this
    # long means the scheduler is gone (it would have declared the node lost).
    heartbeat_timeout_s: float = 10.0
    reconnect_backoff: Backoff = RECONNECT_BACKOFF
    # Where the cluster id this node joined is remembered (membership.py); None: in memory only.
    membership_file: str | None = None
    # TLS to the scheduler; each connection attempt reads the current files. None: plaintext.
    tls: TlsConfig | None = None
    # A bearer token for the scheduler (--token-file, MESHSERVE_TOKEN; role agent, NAME this node). None: none.
    token: str | None = None


class Refused(Exception):
    """A scheduler did not accept the stream; ``leader`` is the leader it named, if any."""

    def __init__(self, target: str, reason: str, leader: str | None = None):
        super().__init__(f"{target}: {reason}" + (f" (leader: {leader})" if leader else ""))
        self.target = target
        self.leader = leader


class Agent:
    """Create with a probe and a supervisor; ``await run()`` until ``stop()``.

    ``shutdown()`` is the SIGTERM path: drain every replica while still
    reporting, send a last report, then stop.
    """

    def __init__(self, config: AgentConfig, probe: GpuProbe, supervisor: Supervisor):
        if not config.schedulers:
            raise ValueError("at least one scheduler address is needed")
        self.config = config
        self.probe = probe
        self.supervisor = supervisor
        self.connected_to: str | None = None    # the scheduler of the live session
        self.sessions = 0                       # streams accepted so far
        self.assignments_version: int | None = None
        self._sequence = 0
        self._leader_hint: str | None = None
        self._failed_last: str | None = None    # the scheduler whose stream failed last
        self._stop = asyncio.Event()
        self._report_now = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._shielded_writes: set[asyncio.Future] = set()   # referenced until done (see _write_to)
        self._call: grpc.aio.StreamStreamCall | None = None   # the live stream to the scheduler
        self._changed = asyncio.Event()
        self._probe_error: str | None = None
        self.membership = ClusterMembership(config.membership_file)
        self._foreign_logged: set[tuple[str, str]] = set()
        self._log_requests = LogRequests(supervisor.options.logs, supervisor)

    # -- lifecycle ---------------------------------------------------------

    def stop(self) -> None:
        """End the connection loop; replicas are left as they are."""
        self._stop.set()

    async def shutdown(self, final_report_timeout_s: float = 2.0) -> None:
        """Drain all replicas (reports keep flowing), report their stop once more, then ``stop()``."""
        self._report_now.set()
        await self.supervisor.drain_all()
        if self._call is not None:
            try:
                async with asyncio.timeout(final_report_timeout_s):
                    await self._write(await self._report())
            except Exception as err:  # best effort: the scheduler will notice the node is gone
                log.info("no final report: %r", err)
        self.stop()

    async def wait_connected(self, timeout: float | None, sessions: int = 1) -> None:
        """For tests and readiness: await until ``sessions`` streams have been accepted and one is live."""
        async with asyncio.timeout(timeout):
            while not (self.sessions >= sessions and self.connected_to):
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def run(self) -> None:
        self._announce_gpus()
        failures = 0
        while not self._stop.is_set():
            accepted = await self._connect_round()
            if self._stop.is_set():
                break
            failures = 1 if accepted else failures + 1
            delay = self.config.reconnect_backoff.delay(failures)
            log.info("reconnecting in %.1fs", delay)
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
            except TimeoutError:
                pass

    def _announce_gpus(self) -> None:
        if self.probe.source == SOURCE_NONE:
            log.warning("no GPUs on this node (%s): reporting gpu_source 'none'; only CPU-only replicas fit",
                        getattr(self.probe, "reason", "no GPU"))
        elif self.probe.source == SOURCE_FAKE:
            log.warning("FAKE GPUs (%r): reporting gpu_source 'fake'; memory follows declared replica usage",
                        getattr(self.probe, "spec", ""))
        else:
            log.info("GPUs read through %s (%r)", self.probe.source, self.probe)

    # -- connecting --------------------------------------------------------

    async def _connect_round(self) -> bool:
        """Try every scheduler (a named leader first) once; True if a stream was accepted (and has ended).

        ``_leader_hint`` afterwards is the best first guess for the next round: the leader the ended
        stream named, else the scheduler that closed it cleanly. A scheduler whose stream failed (it went
        silent, the connection broke) is tried last, so a paused one does not hold up the round."""
        queue = list(self.config.schedulers)
        if self._leader_hint:
            queue.insert(0, self._leader_hint)
        if self._failed_last and self._failed_last in queue:
            queue = [t for t in queue if t != self._failed_last] + [self._failed_last]
        tried: set[str] = set()
        while queue and not self._stop.is_set():
            target = queue.pop(0)
            if target in tried:
                continue
            tried.add(target)
            try:
                self._leader_hint = await self._session(target)
                self._failed_last = None if self._leader_hint else target
                return True
            except Refused as refused:
                log.info("scheduler %s", refused)
                if refused.leader and refused.leader not in tried:
                    queue.insert(0, refused.leader)
            except Exception:  # an agent bug must cost one attempt, not the agent
                log.exception("session with scheduler %s failed", target)
        return False

    async def _gpus(self) -> list:
        """The probe's sample; a failing probe (a GPU fallen off the bus) reads as no GPUs, logged once
        per distinct error: the scheduler then places nothing new here, the safe direction."""
        try:
            gpus = await self.probe.sample(self.supervisor.gpu_loads())
        except Exception as err:
            if repr(err) != self._probe_error:
                log.error("GPU probe %r failed: %r; reporting no GPUs until it recovers", self.probe, err)
            self._probe_error = repr(err)
            return []
        if self._probe_error:
            log.info("GPU probe %r recovered", self.probe)
            self._probe_error = None
        return gpus

    async def _register(self) -> pb.AgentMessage:
        gpus, resources = await asyncio.gather(self._gpus(), asyncio.to_thread(read_host_resources))
        return messages.register(
            node_name=self.config.node_name, agent_version=__version__, labels=dict(self.config.labels),
            gpu_source=self.probe.source, host=self.config.host, gpus=gpus, resources=resources,
            replicas=self.supervisor.running(),
        )

    async def _report(self) -> pb.AgentMessage:
        gpus, resources = await asyncio.gather(self._gpus(), asyncio.to_thread(read_host_resources))
        self._sequence += 1
        return messages.usage_report(sequence=self._sequence, gpu_source=self.probe.source, gpus=gpus,
                                     resources=resources, replicas=self.supervisor.statuses())

    async def _write(self, message: pb.AgentMessage) -> None:
        async with self._write_lock:
            if self._call is None:
                raise ConnectionError("no stream to a scheduler is open")
            await self._call.write(message)
        if message.HasField("report"):
            stopped = [r.replica_id for r in message.report.replicas if r.state == STOPPED]
            self.supervisor.forget_stopped(stopped)  # each stop has now been reported once

    async def _write_to(self, call, message: pb.AgentMessage) -> None:
        """Write on ``call`` (a log answer belongs to the stream its request came on).

        Cancelling the caller (a log answer whose reader went away) never cancels the stream: grpc.aio
        cancels the whole call when a pending write is cancelled, so the write runs shielded to its end.
        """
        write = asyncio.ensure_future(self._locked_write(call, message))
        self._shielded_writes.add(write)
        write.add_done_callback(self._shielded_write_done)
        await asyncio.shield(write)

    def _shielded_write_done(self, write: asyncio.Future) -> None:
        self._shielded_writes.discard(write)
        if not write.cancelled():
            write.exception()   # retrieved here: its caller may be gone

    async def _locked_write(self, call, message: pb.AgentMessage) -> None:
        async with self._write_lock:
            await call.write(message)

    async def _session(self, target: str) -> str | None:
        """One stream to ``target``: raises ``Refused`` unless it answers Registered with our cluster's id;
        else returns when it ends, with where to try first next (see ``_connect_round``)."""
        async with aio_channel(target, self.config.tls, options=CHANNEL_OPTIONS,
                               interceptors=aio_token_interceptors(self.config.token)) as channel:
            call = pb_grpc.AgentServiceStub(channel).Connect()
            try:
                registered = await self._handshake(target, call)
                self._check_cluster(target, registered)
            except BaseException:
                call.cancel()
                raise
            self._call = call
            self.sessions += 1
            self.connected_to = target
            self._notify()
            interval = registered.report_interval_ms / 1000 or self.config.report_interval_s
            heartbeat = registered.heartbeat_timeout_ms / 1000 or self.config.heartbeat_timeout_s
            log.info("registered with scheduler %s (%s) as %s; reporting every %.2fs", target,
                     registered.scheduler_id or "?", self.config.node_name, interval)
            tasks = {
                asyncio.create_task(self._report_loop(interval, heartbeat), name="report"),
                asyncio.create_task(self._receive_loop(call), name="receive"),
                asyncio.create_task(self._stop.wait(), name="stop"),
            }
            next_first: str | None = target
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.get_name() != "stop":
                        # A task that ended cancelled (a read on a call cancelled here) ended the stream too.
                        error = ConnectionError("the stream was cancelled") if task.cancelled() else task.exception()
                        log.warning("stream to scheduler %s ended: %s", target,
                                    _describe(error) if error else "closed by the scheduler")
                        if error is not None:
                            next_first = _leader_named_by(error)
                return next_first
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                call.cancel()
                self._log_requests.close()
                self._call = None
                self.connected_to = None
                self._notify()

    async def _handshake(self, target: str, call) -> pb.Registered:
        try:
            async with asyncio.timeout(self.config.register_timeout_s):
                try:
                    await call.write(await self._register())
                    first = await call.read()
                except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                    # The call failed (a write on a finished call says only that): its status says why.
                    code, details = await call.code(), await call.details()
                    metadata = tuple(await call.trailing_metadata() or ())
                    raise Refused(target, f"{code.name}: {details}", leader_named(code, details, metadata)) from None
        except TimeoutError:
            raise Refused(target, f"no Registered within {self.config.register_timeout_s:g}s") from None
        if first is grpc.aio.EOF or not first.HasField("registered"):
            raise Refused(target, "did not answer Registered")
        return first.registered

    def _check_cluster(self, target: str, registered: pb.Registered) -> None:
        try:
            self.membership.check(target, registered.cluster_id)
        except ForeignCluster as foreign:
            key = (target, registered.cluster_id)
            if key not in self._foreign_logged:      # loud once per scheduler and id, then quieter
                self._foreign_logged.add(key)
                log.error("%s", foreign)
            raise Refused(target, str(foreign)) from None

    async def _report_loop(self, interval: float, heartbeat: float) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                async with asyncio.timeout(heartbeat):
                    await self._write(await self._report())
            except TimeoutError:
                raise ConnectionError(f"a report could not be sent within {heartbeat:g}s") from None
            next_at = max(next_at + interval, loop.time())
            self._report_now.clear()
            try:
                await asyncio.wait_for(self._report_now.wait(), next_at - loop.time())
            except TimeoutError:
                pass

    async def _receive_loop(self, call) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                return
            if message.HasField("assignments"):
                self._apply(message.assignments)
            elif message.HasField("logs"):
                self._log_requests.handle(message.logs, functools.partial(self._write_to, call))
            elif message.HasField("registered"):
                log.info("scheduler re-sent Registered; ignored")

    def _apply(self, assignments: pb.Assignments) -> None:
        specs = [messages.spec_from_assignment(a) for a in assignments.replicas]
        log.info("assignments version %d: %d replica(s)", assignments.version, len(specs))
        self.assignments_version = assignments.version
        self.supervisor.apply(specs)
        self._notify()


def _leader_named_by(error: BaseException) -> str | None:
    """The leader a stream's end status named (a scheduler that stepped down), else None."""
    if isinstance(error, grpc.aio.AioRpcError):
        return leader_named(error.code(), error.details() or "", error.trailing_metadata())
    return None


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return repr(error)
