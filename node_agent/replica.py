"""One assigned replica: its spec, its status, and the task that keeps its process alive.

Lifecycle of a ``Replica`` (states as reported to the scheduler):

    starting -> ready -> (exit) failed -> starting -> ...      restarts with backoff
    any      -> draining (SIGTERM; SIGKILL after the grace period) -> stopped

A draining runtime says NOT_SERVING at once but keeps answering calls for
``drain_delay_s`` (``--drain-delay``), then finishes the calls it holds.

Guarantees:
- At most one process per replica at any time; a replacement (new spec,
  same id) starts only after its predecessor's process has exited.
- ``ready`` means the process printed its listening address AND its
  grpc.health.v1 said SERVING; a process that does neither within the
  startup timeout is killed and counts as a failure.
- Every exit that was not asked for is a failure: the status keeps its exit
  code and a message until the next exit (its first line names the exit and
  the last meaningful error line of the output, crash_reason.py: the
  exception, not a traceback's first line; then the last lines of output),
  and the process is started again after ``Backoff.delay`` (consecutive
  failures; the count resets after ``backoff_reset_s`` of ready).
- With ``ReplicaOptions.logs`` every output line is also appended to the
  replica's rotated file (replica_logs.py), across restarts.
- A process that exits (or is killed) before it ever became ready failed
  to start: usually its model failed to load (a module the host lacks, a bad
  file). After ``max_failed_starts`` such failures in a row the replica is
  not restarted again: it stays ``failed`` with the load error as the first
  line of its message (``load_failure_reason``: the runtime's "failed to
  load" summary, else the last ``...Error:`` line) until it is stopped or
  replaced by a changed spec (a new revision of its deployment). A crash
  after ready is restarted with backoff, without limit.
- A spec the host policy refuses (``ReplicaOptions.policy``) starts no
  process: it stays ``failed`` with "refused by host policy: ..." until it
  is stopped or replaced by a changed spec.
- ``request_stop`` is final and idempotent: the replica drains and ends in
  ``stopped``; it is never restarted afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.common.assignment_env import GPU_MEMORY_ENV
from meshserve.common.backoff import Backoff
from meshserve.common.metrics import METRICS_FLAG
from meshserve.common.ready_line import parse_metrics_address, parse_ready_line
from meshserve.common.runtime_options import SHARED_MEMORY_FLAG, SHARED_MEMORY_NONE
from meshserve.common.security.tls import TlsConfig, aio_channel, without_tls_environment
from meshserve.common.security.tokens import without_token_environment
from meshserve.common.sizes import parse_size
from meshserve.common.states import ReplicaState

from .artifact_cache import ArtifactCache, ArtifactRef, FetchFailed
from .crash_reason import crash_reason
from .gpu_probe import GpuLoad
from .isolation import Isolation, NoIsolation, ReplicaLimits
from .policy import HostPolicy, Refused
from .process import ChildProcess, Clock, Launcher, signal_name
from .replica_load import watch_load
from .replica_logs import ReplicaLogs, ReplicaLogWriter

log = logging.getLogger(__name__)
output_log = logging.getLogger("meshserve.node_agent.replica.output")

STARTING, READY, FAILED, DRAINING, STOPPED = (
    ReplicaState.STARTING, ReplicaState.READY, ReplicaState.FAILED, ReplicaState.DRAINING, ReplicaState.STOPPED)

# What a replica that declares nothing is taken to hold on each of its GPUs
# (fake GPUs only): about a small model plus the CUDA context.
DEFAULT_GPU_MEMORY_BYTES = 1 << 30

_WILDCARD_DIAL = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}

# The crash message carries this much output: enough for a Python traceback's
# end, small enough to send in every report.
TAIL_LINES = 20
TAIL_CHARS = 2000
# The crash reason (crash_reason.py) is looked for in this many last lines: a long traceback's start.
REASON_LINES = 200
# After an exit, output still in the pipes is collected this long; a
# grandchild holding the pipe open must not hold up the restart.
OUTPUT_DRAIN_S = 1.0


@dataclass(frozen=True)
class ReplicaSpec:
    """What the scheduler assigned: a transport-free copy of ``ReplicaAssignment``.

    Specs compare by value; a changed spec for the same id replaces the process.
    ``env`` is sorted (key, value) pairs so that specs are hashable and comparable.
    """

    replica_id: str
    deployment: str = ""
    revision: int = 0
    model_repository: str = ""
    model_name: str = ""
    gpu_indices: tuple[int, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    runtime_args: tuple[str, ...] = ()
    # Set: the model comes from the artifact cache (artifact_cache.py), not model_repository.
    artifact_digest: str = ""
    artifact_source: str = ""

    @classmethod
    def create(cls, replica_id: str, *, env: Mapping[str, str] | None = None, gpu_indices=(), runtime_args=(),
               **fields) -> ReplicaSpec:
        return cls(replica_id=replica_id, env=tuple(sorted((env or {}).items())),
                   gpu_indices=tuple(gpu_indices), runtime_args=tuple(runtime_args), **fields)

    @property
    def gpu_memory_bytes(self) -> int:
        """Declared memory per GPU: env ``MESHSERVE_GPU_MEMORY_BYTES`` (``8589934592`` or ``8GiB``), else 1 GiB.

        An unreadable value falls back to the default (and is logged when the replica is created).
        """
        declared = self.declared_gpu_memory()
        return DEFAULT_GPU_MEMORY_BYTES if declared is None else declared

    def declared_gpu_memory(self) -> int | None:
        """The readable value of ``MESHSERVE_GPU_MEMORY_BYTES``, or None (absent or unreadable)."""
        value = dict(self.env).get(GPU_MEMORY_ENV)
        if value is None:
            return None
        try:
            return parse_size(value)
        except ValueError:
            return None

    @property
    def cuda_visible_devices(self) -> str:
        """``"0,2"``; ``""`` for a CPU-only replica (CUDA then sees no device)."""
        return ",".join(str(index) for index in self.gpu_indices)


@dataclass(frozen=True)
class ReplicaStatus:
    replica_id: str
    deployment: str
    revision: int
    state: str
    address: str = ""       # while a process is listening
    pid: int = 0            # while a process runs
    gpu_indices: tuple[int, ...] = ()
    exit_code: int = 0      # of the last exit
    message: str = ""       # why the last exit, or what the replica waits for
    restarts: int = 0
    in_flight: int = 0      # inference calls in progress, from the runtime (node_agent/replica_load.py)
    queued: int = 0
    metrics_address: str = ""   # the process's GET /metrics, while it has one (ReplicaOptions.metrics)


@dataclass
class ReplicaOptions:
    """How replica processes are started and stopped (shared by every replica of a supervisor)."""

    listen_host: str = "127.0.0.1"      # where a replica binds; port 0 always
    advertise_host: str | None = None   # the host in reported addresses; default listen_host
    python: str = sys.executable
    base_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    # A replica fails to load its model -> exit 1 -> failed, restarted: rather
    # than a replica that is "ready" with nothing to serve.
    strict: bool = True
    # How long a stopped replica keeps serving after SIGTERM while it says NOT_SERVING
    # (the runtime's --drain-delay), so that calls proxies send before they see it go
    # are still answered. Proxies learn of it at once twice over (the route table the
    # scheduler pushed before it told this agent to stop, and the replica's own health
    # watch), within milliseconds; 2 s covers a proxy whose event loop is busy under
    # load many times over, and costs a removal only 2 s of a process that serves anyway.
    drain_delay_s: float = 2.0
    # More than the drain delay plus the runtime's own default grace period (30 s)
    # plus a little, so a draining replica finishes its in-flight requests before SIGKILL.
    stop_grace_s: float = 40.0
    # A large model can take minutes to load onto a GPU; past this it is stuck.
    startup_timeout_s: float = 600.0
    backoff: Backoff = field(default_factory=Backoff)
    backoff_reset_s: float = 60.0
    # Starts in a row that end before ready, after which the replica stays failed: with the default
    # backoff 0.5+1+2+4+8 s, about 16 s plus the load attempts. Enough for a transient cause (a port,
    # a file being copied); a missing module does not fix itself, so retrying forever only burns CPU.
    max_failed_starts: int = 6
    # What this host agrees to run (node_agent/policy.py). The node-agent command always sets one;
    # None (library use, unit tests with fake launchers) runs every assignment as given.
    policy: HostPolicy | None = None
    # The agent's TLS settings: handed to every replica as MESHSERVE_TLS_* (a spec's env cannot change
    # them) and used for the health checks. None: plaintext, loopback replicas only.
    tls: TlsConfig | None = None
    # Each replica serves GET /metrics on loopback, a port of its own choosing, which the agent
    # re-exports with replica and node labels (node_agent/metrics.py). Off: no metrics endpoint.
    metrics: bool = False
    # Where each replica's stdout and stderr are kept, a rotated file per replica (replica_logs.py).
    # None: output is only logged at DEBUG.
    logs: ReplicaLogs | None = None
    # Fetches, verifies and shares the models of assignments that carry a digest (artifact_cache.py).
    # None: such an assignment fails with "no artifact cache on this agent".
    artifacts: ArtifactCache | None = None
    # How each replica's process is limited to its booked memory and CPU (node_agent/isolation.py).
    isolation: Isolation = field(default_factory=NoIsolation)


WaitReady = Callable[[str], Awaitable[None]]


def _dial_address(address: str) -> str:
    """A wildcard bind address is dialled on loopback."""
    host, port = address.rsplit(":", 1)
    return f"{_WILDCARD_DIAL.get(host, host)}:{port}"


async def wait_serving(address: str, tls: TlsConfig | None = None) -> None:
    """Return once grpc.health.v1 at ``address`` says SERVING (a Watch stream: no polling)."""
    async with aio_channel(_dial_address(address), tls) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)   # Any: the health stubs declare no methods on it
        call = stub.Watch(health_pb2.HealthCheckRequest(service=""), wait_for_ready=True)
        async for response in call:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                call.cancel()
                return
    raise ConnectionError(f"health watch at {address} ended before SERVING")


class _Crash(Exception):
    """A process exit nobody asked for; ``ready_at`` is when it had become ready (clock time), if it had."""

    def __init__(self, exit_code: int, message: str, ready_at: float | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message
        self.ready_at = ready_at


# The runtime's --strict summary: which models failed to load, and why.
_STRICT_SUMMARY = re.compile(r"model\(s\) failed to load: (.+)$")


def load_failure_reason(message: str) -> str:
    """The one line of a crash message that says why the model did not load: the runtime's summary, else the
    crash reason of its output (crash_reason.py), else its first line."""
    lines = [line.strip() for line in message.splitlines()]
    for line in reversed(lines):
        found = _STRICT_SUMMARY.search(line)
        if found:
            return found.group(1)
    return crash_reason(lines) or (lines[0] if lines else "failed to start")


def _retrieve(task: asyncio.Future) -> None:
    """Mark a finished task's exception as seen: the outcome was handled another way."""
    if task.done() and not task.cancelled():
        task.exception()


class Replica:
    """Keeps one replica's process running until ``request_stop``. Create, then ``start()``."""

    def __init__(self, spec: ReplicaSpec, options: ReplicaOptions, *, launcher: Launcher, clock: Clock,
                 wait_ready: WaitReady = wait_serving, on_change: Callable[[], None] = lambda: None,
                 predecessor: Replica | None = None):
        self.spec = spec
        self.options = options
        self._launcher = launcher
        self._clock = clock
        self._wait_ready = wait_ready
        self._on_change = on_change
        self._predecessor = predecessor
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._status = ReplicaStatus(spec.replica_id, spec.deployment, spec.revision, STARTING,
                                     gpu_indices=spec.gpu_indices)
        self._dial_target = ""
        # Decided once per spec: a refused assignment is not retried until the scheduler changes it.
        self._repository, self._refusal = spec.model_repository, None
        if options.policy is not None:
            try:
                self._repository = options.policy.admit(spec)
            except Refused as refused:
                self._refusal = str(refused)
        self._limits = ReplicaLimits.from_env(dict(spec.env), spec.replica_id)   # isolation: booked memory, CPU
        if GPU_MEMORY_ENV in dict(spec.env) and spec.declared_gpu_memory() is None:
            log.warning("replica %s: unreadable %s=%r; counting the default %d bytes per GPU", spec.replica_id,
                        GPU_MEMORY_ENV, dict(spec.env)[GPU_MEMORY_ENV], DEFAULT_GPU_MEMORY_BYTES)

    # -- observed ----------------------------------------------------------

    @property
    def status(self) -> ReplicaStatus:
        return self._status

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def load(self) -> GpuLoad | None:
        """The GPU memory this replica's live process is declared to hold (fake GPUs), or None."""
        if not self._status.pid or not self.spec.gpu_indices:
            return None
        return GpuLoad(self._status.pid, self.spec.gpu_indices, self.spec.gpu_memory_bytes)

    def _set(self, **changes) -> None:
        self._status = dataclasses.replace(self._status, **changes)
        self._on_change()

    # -- commands ----------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"replica {self.spec.replica_id}")

    def request_stop(self) -> None:
        self._stop.set()

    async def finished(self) -> None:
        """Wait until the replica is stopped (after ``request_stop``)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    # -- the loop ----------------------------------------------------------

    async def _run(self) -> None:
        try:
            if self._predecessor is not None:
                self._set(message="waiting for the previous process of this replica to stop")
                await self._predecessor.finished()
                self._set(message="")
            if self._refusal is not None:
                await self._stay_refused()
            elif not self.spec.artifact_digest:
                await self._supervise()
            else:
                await self._supervise_fetched()
        except Exception as err:  # a bug here must not leave a replica silently unsupervised
            log.exception("replica %s: supervision failed", self.spec.replica_id)
            self._set(state=FAILED, pid=0, address="", message=f"agent error: {err!r}")
            return
        self._set(state=STOPPED, pid=0, address="")

    async def _supervise_fetched(self) -> None:
        """Fetch the model into the artifact cache (retrying with backoff), hold it while supervising."""
        cache = self.options.artifacts
        if cache is None:
            self._refusal = "no artifact cache on this agent: cannot fetch the model"
            await self._stay_refused()
            return
        spec = self.spec
        ref = ArtifactRef(spec.artifact_digest, spec.artifact_source, spec.model_name)
        failures = 0
        while not self._stop.is_set():
            fetch = asyncio.ensure_future(cache.acquire(ref, self._fetch_progress))
            stop = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
            if not fetch.done():
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)
                return
            error = fetch.exception()
            if error is None:
                self._repository = str(fetch.result())
                try:
                    self._set(message="")
                    await self._supervise()
                finally:
                    cache.release(ref)
                return
            failures += 1
            delay = self.options.backoff.delay(failures)
            reason = str(error) if isinstance(error, FetchFailed) else repr(error)
            log.warning("replica %s: fetch failed: %s; retrying in %.1fs", spec.replica_id, reason, delay)
            self._set(state=FAILED, message=f"fetch failed: {reason}")
            if await self._stop_requested_within(delay):
                return

    def _fetch_progress(self, done: int, total: int | None) -> None:
        of = f"/{total / 1e6:.0f}" if total else ""
        self._set(state=STARTING, message=f"fetching {done / 1e6:.0f}{of} MB")

    async def _stay_refused(self) -> None:
        """No process: report the refusal until a stop (the assignment changed or went away)."""
        log.warning("replica %s: %s", self.spec.replica_id, self._refusal)
        self._set(state=FAILED, message=self._refusal)
        await self._stop.wait()

    async def _supervise(self) -> None:
        failures = failed_starts = 0
        while not self._stop.is_set():
            try:
                await self._run_process()
            except _Crash as crash:
                ready_for = 0.0 if crash.ready_at is None else self._clock.monotonic() - crash.ready_at
                failures = 1 if ready_for >= self.options.backoff_reset_s else failures + 1
                failed_starts = failed_starts + 1 if crash.ready_at is None else 0
                if failed_starts >= self.options.max_failed_starts:
                    await self._stay_failed(crash, failed_starts)
                    return
                delay = self.options.backoff.delay(failures)
                log.warning("replica %s: %s; restarting in %.1fs", self.spec.replica_id,
                            crash.message.split("; last output:")[0], delay)
                self._set(state=FAILED, pid=0, address="", exit_code=crash.exit_code, message=crash.message)
                if await self._stop_requested_within(delay):
                    return
                self._set(restarts=self._status.restarts + 1)
                continue
            return  # the process ended because a stop was asked for

    async def _stay_failed(self, crash: _Crash, failed_starts: int) -> None:
        """Given up: no process until a stop (the assignment changed or went away)."""
        reason = load_failure_reason(crash.message)
        log.error("replica %s: failed to start %d times in a row; not restarted until its assignment changes: %s",
                  self.spec.replica_id, failed_starts, reason)
        self._set(state=FAILED, pid=0, address="", exit_code=crash.exit_code,
                  message=f"{reason}\n(failed to start {failed_starts} times in a row; not restarted until the "
                          f"deployment's revision changes) {crash.message}")
        await self._stop.wait()

    async def _stop_requested_within(self, seconds: float) -> bool:
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()
        return self._stop.is_set()

    def _command(self) -> tuple[list[str], dict[str, str]]:
        spec, options = self.spec, self.options
        argv = [options.python, "-m", "meshserve.runtime", "--model-repository", self._repository,
                "--model", spec.model_name, "--listen", f"{options.listen_host}:0"]
        if options.strict:
            argv.append("--strict")
        argv += ["--drain-delay", f"{options.drain_delay_s:g}"]
        # The host's choice: a spec may not pass --shared-memory (node_agent/runtime_flags.py).
        argv += [SHARED_MEMORY_FLAG, options.policy.shared_memory if options.policy else SHARED_MEMORY_NONE]
        argv.extend(spec.runtime_args)  # after ours: a deployment's runtime_args may override them
        if options.metrics:   # last: the agent scrapes it, so a spec cannot move it off loopback
            argv += [METRICS_FLAG, "127.0.0.1:0"]
        env = without_token_environment(without_tls_environment({**options.base_env, "PYTHONUNBUFFERED": "1",
                                                                 **dict(spec.env)}))   # the agent's token stays
        env.update((options.tls or TlsConfig()).as_environment())   # the agent's TLS, whatever the spec says
        # gpu_indices decide, whatever the env says: the scheduler placed the replica there.
        env["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible_devices
        # isolation: the process runs under its booked memory and CPU (node_agent/isolation.py)
        argv = options.isolation.wrap(argv, self._limits, spec.replica_id)
        return argv, env

    async def _run_process(self) -> None:
        """Run one process until it exits. Returns when it was stopped on request; raises ``_Crash`` otherwise."""
        argv, env = self._command()
        try:
            process = await self._launcher.launch(argv, env)
        except OSError as err:
            raise _Crash(-1, f"cannot start {argv[0]}: {err}") from None
        log.info("replica %s: started pid %d (CUDA_VISIBLE_DEVICES=%r)", self.spec.replica_id, process.pid,
                 env["CUDA_VISIBLE_DEVICES"])
        self._set(state=STARTING, pid=process.pid, address="", metrics_address="")
        tail: collections.deque[str] = collections.deque(maxlen=REASON_LINES)
        listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        reader = asyncio.create_task(self._read_output(process, tail, listening, self._log_writer()))
        exited = asyncio.ensure_future(process.wait())
        stop = asyncio.ensure_future(self._stop.wait())
        ready = asyncio.create_task(self._become_ready(listening))
        load: asyncio.Task | None = None
        ready_at = None
        try:
            pending = {exited, stop, ready}
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if exited in done:
                    break
                if stop in done:
                    await self._drain(process, exited)
                    return
                if ready in done:
                    error = ready.exception()
                    if error is None:
                        ready_at = self._clock.monotonic()
                        self._set(state=READY, address=ready.result())
                        load = asyncio.create_task(self._watch_load(self._dial_target))
                        log.info("replica %s: ready at %s", self.spec.replica_id, ready.result())
                        continue
                    # Output closed or health failed: usually the process is on its way out.
                    await asyncio.wait({exited}, timeout=OUTPUT_DRAIN_S)
                    if not exited.done():
                        process.send_signal(signal.SIGKILL)
                        code = await exited
                        raise _Crash(code, f"not ready: {error}; killed{self._reason(tail)}{self._tail_text(tail)}")
                    break
            code = exited.result()
            await asyncio.wait({reader}, timeout=OUTPUT_DRAIN_S)
            # isolation: "oom-killed: memory limit 1 GiB" first when the limits explain the exit
            why = await self.options.isolation.exit_reason(code, self._limits, self.spec.replica_id, tail)
            reason = f"{why + '; ' if why else ''}exited with code {code}{signal_name(code)}{self._reason(tail)}"
            raise _Crash(code, reason + self._tail_text(tail), ready_at)
        finally:
            for task in (reader, stop, ready, load):
                if task is not None:
                    task.cancel()
                    _retrieve(task)
            self._on_load(0, 0)
            if not exited.done():  # only when this task itself is cancelled: never leave an orphan
                process.send_signal(signal.SIGKILL)

    def _on_load(self, in_flight: int, queued: int) -> None:
        if (self._status.in_flight, self._status.queued) != (in_flight, queued):
            self._status = dataclasses.replace(self._status, in_flight=in_flight, queued=queued)

    async def _watch_load(self, target: str) -> None:
        await watch_load(target, self.options.tls, self._on_load)

    async def _become_ready(self, listening: asyncio.Future[str]) -> str:
        try:
            async with asyncio.timeout(self.options.startup_timeout_s):
                address = await listening
                await self._wait_ready(address)
                self._dial_target = _dial_address(address)
        except TimeoutError:
            raise TimeoutError(f"no SERVING health within {self.options.startup_timeout_s:g}s") from None
        host = self.options.advertise_host
        return address if host is None else f"{host}:{address.rsplit(':', 1)[1]}"

    def _log_writer(self) -> ReplicaLogWriter | None:
        if self.options.logs is None:
            return None
        try:
            return self.options.logs.writer(self.spec.replica_id)
        except (ValueError, OSError) as err:   # no file: the replica still runs, its output still in the tail
            log.warning("replica %s: output not kept: %s", self.spec.replica_id[:80], err)
            return None

    async def _read_output(self, process: ChildProcess, tail, listening: asyncio.Future[str],
                           writer: ReplicaLogWriter | None = None) -> None:
        try:
            async for stream, line in process.lines():
                tail.append(line)
                output_log.debug("[%s %s] %s", self.spec.replica_id, stream, line)
                if writer is not None:
                    writer.write(line)
                if stream == "stdout" and not listening.done():
                    address = parse_ready_line(line, "runtime")
                    if address is not None:
                        self._set(metrics_address=parse_metrics_address(line) or "")
                        listening.set_result(address)
            if not listening.done():
                listening.set_exception(ConnectionError("output closed before the listening line"))
        finally:
            if writer is not None:
                writer.close()

    async def _drain(self, process: ChildProcess, exited: asyncio.Future[int]) -> None:
        log.info("replica %s: draining pid %d", self.spec.replica_id, process.pid)
        self._set(state=DRAINING)
        process.send_signal(signal.SIGTERM)
        done, _ = await asyncio.wait({exited}, timeout=self.options.stop_grace_s)
        if not done:
            log.warning("replica %s: still running %.0fs after SIGTERM; SIGKILL", self.spec.replica_id,
                        self.options.stop_grace_s)
            process.send_signal(signal.SIGKILL)
        code = await exited
        self._set(exit_code=code, message=f"stopped on request; exited with code {code}{signal_name(code)}")

    @staticmethod
    def _reason(tail) -> str:
        reason = crash_reason(list(tail))
        return f": {reason}" if reason else ""

    @staticmethod
    def _tail_text(tail) -> str:
        if not tail:
            return ""
        text = "\n".join(list(tail)[-TAIL_LINES:])
        return "; last output:\n" + (text if len(text) <= TAIL_CHARS else "…" + text[-TAIL_CHARS:])
