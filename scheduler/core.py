"""The scheduler's brain while it leads: node streams, reconciling, assignments and routes.

Guarantees:
- Only the leader accepts agents and admin changes; a standby refuses with
  FAILED_PRECONDITION naming the leader, so clients move on to it.
- When it stops leading (``stop_leading``: its election lost the lease, a
  fenced write failed, the store went away) every stream it serves, agent
  streams and route watches alike, ends at once with that same refusal
  (naming the new leader when it is known), so nobody keeps following a
  deposed leader.
- A new term starts with the lost-node grace (``LOST_GRACE_HEARTBEATS``
  heartbeat timeouts): no node is declared lost before its agent had time to
  notice the change, back off and reconnect. The same grace restarts when the
  scheduler finds it was itself paused (a stopped process, a starved host)
  for longer than a heartbeat timeout: the silence it sees is its own.
- Every agent always holds the complete, latest set of replicas its node
  should run (sent whenever it changes): level-triggered, so a lost message
  or a reconnect needs no special handling.
- One stream per node: a Register for a node whose stream is open and
  reported within the heartbeat timeout is refused (FAILED_PRECONDITION
  "node X is already connected"), so an impostor cannot push the real agent
  off. Once the old stream is closed, or silent past the heartbeat timeout
  (a half-open connection), a new one takes its place.
- A replica is assigned to at most one node at a time: a returning agent
  gets only what the store says is its own, and stops anything else.
- What an agent reports is a claim: a replica turns ready (and is routed)
  only once the scheduler has called the address reported and the replica
  said it serves its model (scheduler/verify.py); until then it stays
  starting, with the reason.
- A deployment's ``env`` (which may hold secrets) is not sent to an agent
  whose stream is neither authenticated TLS nor from loopback
  (scheduler/agent_channel.py).
- Route watchers get a complete table whenever the set of ready replicas
  changes. Every deployment has a route, with no endpoints while none is
  ready (so a proxy answers UNAVAILABLE, not NOT_FOUND); a lost node's
  replicas stay routed until their replacements are ready.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from meshserve.common.assignment_env import CPU_ENV, GPU_MEMORY_ENV, MEMORY_ENV
from meshserve.common.errors import FailedPrecondition, InvalidArgument
from meshserve.common.leader import not_leader_message
from meshserve.protos.mesh import control_pb2 as mesh

from .autoscaling import Autoscaling
from .cluster import Cluster, LiveNode
from .log_relay import LogRelay
from .placing import replica_needs
from .reconciler import Reconciler
from .records import (
    DRAINING,
    FAILED,
    LEAVING,
    LOST,
    NODE_LOST,
    NODE_READY,
    READY,
    STARTING,
    DeploymentRecord,
    NodeRecord,
    ReplicaRecord,
)
from .store import StoreError
from .verify import RETRY_AFTER_S, GrpcReplicaVerifier, ReplicaVerifier
from .writer import FencedWriter, NotLeader

log = logging.getLogger(__name__)

# Agents report once a second; a node is lost after this many silent seconds.
# Long enough to ride out a GC pause or a busy host, short enough to heal quickly.
DEFAULT_REPORT_INTERVAL_S = 1.0
DEFAULT_HEARTBEAT_TIMEOUT_S = 5.0
# How often the reconciler runs without being asked (it checks heartbeats).
RECONCILE_TICK_S = 0.5
# A new leader declares no node lost for this many heartbeat timeouts (15 s by
# default). An agent needs: to notice the old scheduler is gone (at once on a
# reset connection, within its keepalive on a silent one, node_agent/agent.py),
# one reconnect backoff (capped at 2 s, below one heartbeat timeout), and a
# Register; three timeouts leave room for all of that on a loaded host.
LOST_GRACE_HEARTBEATS = 3
_AGENT_STATES = {STARTING: STARTING, READY: READY, FAILED: FAILED}   # reported states the scheduler adopts


class SchedulerCore:
    def __init__(self, writer: FencedWriter, *, scheduler_id: str,
                 report_interval_s: float = DEFAULT_REPORT_INTERVAL_S,
                 heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S, clock=time.monotonic,
                 verifier: ReplicaVerifier | None = None):
        self.cluster = Cluster(clock=clock)
        # Checks a replica's claim to be ready before it is routed (scheduler/verify.py).
        self.verifier: ReplicaVerifier = verifier if verifier is not None else GrpcReplicaVerifier()
        self._refused_claims: dict[str, tuple[str, float, str]] = {}   # replica -> (address, retry at, why)
        self._no_secrets: set[str] = set()   # nodes whose agent stream may not carry a spec's env
        self.writer = writer
        self.scheduler_id = scheduler_id
        self.report_interval_s = report_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.reconciler = Reconciler(self.cluster, writer, heartbeat_timeout_s,
                                     lost_grace_s=LOST_GRACE_HEARTBEATS * heartbeat_timeout_s)
        self.leading = False
        self.leader_hint = ""            # "id at address" of the leader, when this one is a standby
        self.cluster_id = ""             # the store's identity (scheduler/store/identity.py), told to agents
        self.deposed = asyncio.Event()   # set when a fenced write failed: this term is over
        self._dirty = asyncio.Event()
        self._node_channels: dict[str, asyncio.Queue] = {}
        self.log_relay = LogRelay()      # `ctl logs`, over the agents' streams
        self._sent_assignments: dict[str, bytes] = {}
        self._assignment_version = 0
        self._route_watchers: set[asyncio.Queue] = set()
        self._route_table = mesh.RouteTable()
        self._loop_task: asyncio.Task | None = None
        self.autoscaling = Autoscaling(self.cluster, self._commit_deployment)
        # Told each reconcile pass's duration in seconds (scheduler/metrics.py); nothing by default.
        self.observe_reconcile: Callable[[float], None] = lambda seconds: None

    # -- leadership ----------------------------------------------------------

    def require_leader(self) -> None:
        if not self.leading:
            raise NotLeader(not_leader_message(self.scheduler_id, self.leader_hint))

    async def start_leading(self, store) -> None:
        await self.cluster.load(store)
        self.leader_hint = ""            # this one leads now; a refusal at the end of the term names whom it learns
        self.deposed.clear()
        self.reconciler.begin_grace()
        self.autoscaling.reset()
        self.leading = True
        self._loop_task = asyncio.create_task(self._reconcile_loop(), name="reconcile")
        self.poke()

    async def stop_leading(self, find_leader_hint: Callable[[], Awaitable[str]] | None = None) -> None:
        """Stop acting as the leader at once, then end every stream this scheduler serves.

        ``find_leader_hint`` (bounded by the caller) names the new leader for the
        refusal the streams end with; it runs after this scheduler has stopped
        reconciling and accepting, so asking cannot delay the step-down itself."""
        self.leading = False
        if self._loop_task:
            if self._loop_task is not asyncio.current_task():
                self._loop_task.cancel()
                await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        if find_leader_hint is not None:
            self.leader_hint = await find_leader_hint()
        # Each stream sees None and ends with the not-leader refusal (agent_service, route_service).
        for queue in list(self._node_channels.values()):
            queue.put_nowait(None)
        for queue in list(self._route_watchers):
            queue.put_nowait(None)
        self._route_watchers.clear()

    async def _commit_deployment(self, record: DeploymentRecord, **changes) -> DeploymentRecord:
        """``record`` with ``changes``, written; memory takes it only once the store has."""
        updated = dataclasses.replace(record, **changes)
        await self.writer.put(updated)
        self.cluster.deployments[updated.name] = updated
        return updated

    def wake(self, deployment: str) -> str:
        """A proxy holds a call for ``deployment`` and it has no replica: ask the autoscaler for one."""
        self.require_leader()
        message = self.autoscaling.wake(deployment)
        self.poke()
        return message

    def poke(self) -> None:
        """Ask for a reconcile pass soon (coalesced)."""
        self._dirty.set()

    def _fenced_out(self, where: str) -> None:
        """A fenced write failed: a newer leader holds the election key. End this term."""
        if not self.deposed.is_set():
            log.error("a fenced write failed (%s): another scheduler leads; stepping down", where)
        self.deposed.set()

    async def _reconcile_loop(self) -> None:
        last_tick = self.cluster.clock()
        while True:
            try:
                async with asyncio.timeout(RECONCILE_TICK_S):
                    await self._dirty.wait()
            except TimeoutError:
                pass
            self._dirty.clear()
            now = self.cluster.clock()
            if now - last_tick > self.heartbeat_timeout_s:
                # We were stopped or starved: the agents' silence is ours, not theirs.
                log.warning("the reconcile loop stalled for %.1fs; no node is declared lost for %.1fs",
                            now - last_tick, self.reconciler.lost_grace_s)
                self.reconciler.begin_grace()
            last_tick = now
            started = time.perf_counter()
            try:
                if self.autoscaling.due(now):
                    await self.autoscaling.tick(now)
                await self.reconciler.reconcile_once()
            except NotLeader:
                self._fenced_out("reconcile")
                return
            except StoreError as exc:  # an outage, not a bug: one line, no traceback
                log.warning("reconcile pass failed: %s; retrying on the next tick", exc)
            except Exception:
                log.exception("reconcile pass failed; retrying on the next tick")
            self.observe_reconcile(time.perf_counter() - started)
            # Routes first: a replica leaving (draining) is out of every proxy's table before
            # its agent is told to stop it (and its runtime's drain delay covers the rest).
            self._publish_routes()
            self._push_assignments()

    # -- agents --------------------------------------------------------------

    async def register(self, register: mesh.Register, carries_secrets: bool = True) -> asyncio.Queue:
        """A (re)connecting agent: record the node, adopt its replicas, open its channel.

        ``carries_secrets`` false (an agent connected without TLS from another host): its
        assignments go without the specs' ``env``, which may hold secrets."""
        self.require_leader()
        (self._no_secrets.discard if carries_secrets else self._no_secrets.add)(register.node_name)
        if not carries_secrets:
            log.warning("node %s: its agent connected without TLS from another host; deployments' env is "
                        "not sent to it", register.node_name)
        try:
            return await self._register(register)
        except NotLeader:
            self._fenced_out(f"registering node {register.node_name}")
            raise

    async def _register(self, register: mesh.Register) -> asyncio.Queue:
        name = register.node_name
        if not name:
            raise InvalidArgument("Register.node_name is empty")
        cluster = self.cluster
        self._refuse_second_stream(name)
        node = cluster.nodes.get(name) or NodeRecord(name=name)
        before = node.to_json()
        node.host, node.labels, node.gpu_source = register.host, dict(register.labels), register.gpu_source
        node.state = NODE_READY
        node.last_seen_unix_ms = time.time_ns() // 1_000_000
        cluster.nodes[name] = node
        if node.to_json() != before:
            await self.writer.put(node)
        cluster.record_event(f"node/{name}", f"registered ({register.gpu_source} GPUs: {len(register.gpus)})")
        previous = self._node_channels.pop(name, None)
        if previous is not None:
            previous.put_nowait(None)  # silent past the heartbeat timeout (_refuse_second_stream): ended
        live = LiveNode(connected=True, last_report=cluster.clock())
        cluster.live[name] = live
        self._apply_usage(name, register.gpus, register.resources, register.replicas)
        channel: asyncio.Queue = asyncio.Queue()
        self._node_channels[name] = channel
        self._sent_assignments.pop(name, None)
        await self._apply_replica_states(name, register.replicas)
        self._publish_routes()  # before its assignments, as in every pass (see _reconcile_loop)
        self._push_assignments(only=name)
        self.poke()
        return channel

    def _refuse_second_stream(self, name: str) -> None:
        if name not in self._node_channels:
            return
        live = self.cluster.live.get(name)
        silent_s = self.cluster.clock() - live.last_report if live else float("inf")
        if silent_s < self.heartbeat_timeout_s:
            raise FailedPrecondition(f"node {name} is already connected (its stream reported {silent_s:.1f}s ago); "
                                     f"a second connection is refused")
        log.warning("node %s: replacing its stream, silent for %.1fs", name, silent_s)

    async def report(self, name: str, report: mesh.UsageReport) -> None:
        try:
            await self._report(name, report)
        except NotLeader:
            self._fenced_out(f"a report of node {name}")
            raise

    async def _report(self, name: str, report: mesh.UsageReport) -> None:
        self._apply_usage(name, report.gpus, report.resources, report.replicas)
        node = self.cluster.nodes.get(name)
        if node is not None and node.state == NODE_LOST:
            # Back after being lost: what moved away stays away (it is no longer in this
            # node's assignments, so the agent stops it); the node takes new replicas again.
            node.state = NODE_READY
            await self.writer.put(node)
            self.cluster.record_event(f"node/{name}", "returned after being lost")
            log.info("node %s returned", name)
            self.poke()
        if await self._apply_replica_states(name, report.replicas):
            self._publish_routes()
            self.poke()

    def channel_of(self, node: str) -> asyncio.Queue | None:
        """The outgoing queue of ``node``'s live agent stream, or None when its agent is not connected."""
        return self._node_channels.get(node)

    def disconnect(self, name: str, channel: asyncio.Queue) -> None:
        self.log_relay.stream_ended(channel)
        if self._node_channels.get(name) is channel:
            del self._node_channels[name]
            live = self.cluster.live.get(name)
            if live:
                live.connected = False
            self.cluster.record_event(f"node/{name}", "stream closed")

    async def delete_node(self, name: str) -> None:
        """Forget a node: its record, live usage and agent stream (closed: a live agent registers
        again as a new node). Its replicas are evicted at once, as from any unknown node, so a
        re-registering agent cannot adopt them back."""
        await self.writer.delete(self.cluster.nodes[name])
        del self.cluster.nodes[name]
        self.cluster.live.pop(name, None)
        self._sent_assignments.pop(name, None)
        channel = self._node_channels.pop(name, None)
        if channel is not None:
            channel.put_nowait(None)
        self.cluster.record_event(f"node/{name}", "deleted")
        await self.reconciler.evict_from_unusable_nodes()
        self.poke()

    def _apply_usage(self, name, gpus, resources, replicas) -> None:
        live = self.cluster.live.setdefault(name, LiveNode())
        live.last_report = self.cluster.clock()
        live.gpus = list(gpus)
        live.resources = resources
        live.replicas = {status.replica_id: status for status in replicas}

    async def _apply_replica_states(self, node: str, statuses) -> bool:
        """Take the agent's word for the replicas the store places on its node; ignore the rest.

        A draining replica stays draining until the agent reports it stopped or stops
        reporting it; then its record goes. A lost replica whose node reports again is
        adopted back with the state the agent reports, or goes if the agent no longer runs it."""
        changed: list[ReplicaRecord | None] = []
        reported = {status.replica_id: status for status in statuses}
        for replica in self.cluster.replicas_on(node):
            status = reported.get(replica.id)
            if replica.state in LEAVING and (status is None or status.state == "stopped"):
                await self.reconciler.forget(replica)
                self.cluster.record_event(f"replica/{replica.id}", "stopped and removed")
                changed.append(None)
        for status in statuses:
            claimed = self.cluster.replicas.get(status.replica_id)
            if claimed is None or claimed.node != node or claimed.state == DRAINING:
                continue  # not ours to run: the agent stops it, since it is not assigned
            replica = claimed
            state = _AGENT_STATES.get(status.state, replica.state)
            reason = status.message if state == FAILED else ""
            if state == READY and (replica.state != READY or replica.address != status.address):
                problem = await self._check_claim(replica, status.address)
                if self.cluster.replicas.get(replica.id) is not replica or replica.state == DRAINING:
                    continue  # removed or drained while the claim was checked
                if problem:   # not routed: it stays (or goes back to) starting, saying why
                    state, reason = STARTING, problem
            update = (state, status.address, status.pid, status.restarts, reason)
            if update != (replica.state, replica.address, replica.pid, replica.restarts, replica.reason):
                if state != replica.state:
                    self.cluster.record_event(f"replica/{replica.id}", f"{replica.state} -> {state}"
                                              + (f": {reason}" if reason else ""))
                replica.state, replica.address, replica.pid, replica.restarts, replica.reason = update
                changed.append(replica)
        await self.writer.put_many([replica for replica in changed if replica is not None])
        return bool(changed)

    async def _check_claim(self, replica, address: str) -> str:
        """Why the agent's claim that ``replica`` is ready at ``address`` is not believed ("" if it is).

        One call to the replica (scheduler/verify.py); a refused claim is not checked again
        for RETRY_AFTER_S."""
        now = self.cluster.clock()
        refused = self._refused_claims.get(replica.id)
        if refused is not None and refused[0] == address and now < refused[1]:
            return refused[2]
        model = replica.models[0] if replica.models else self._model_of(replica)
        problem = await self.verifier.problem(address, model) if address else "reported ready without an address"
        if problem:
            for gone in [key for key in self._refused_claims if key not in self.cluster.replicas]:
                del self._refused_claims[gone]
            self._refused_claims[replica.id] = (address, now + RETRY_AFTER_S, problem)
            if refused is None or refused[0] != address:
                log.warning("replica %s is not routed: %s", replica.id, problem)
                self.cluster.record_event(f"replica/{replica.id}", f"not routed: {problem}")
        else:
            self._refused_claims.pop(replica.id, None)
        return problem

    def _model_of(self, replica: ReplicaRecord) -> str:
        deployment = self.cluster.deployments.get(replica.deployment)
        return deployment.spec_of(replica.revision).model.name if deployment is not None else ""

    def assignments_for(self, node: str) -> mesh.Assignments:
        assignments = mesh.Assignments()
        for replica in self.cluster.replicas_on(node):
            deployment = self.cluster.deployments.get(replica.deployment)
            if deployment is None or replica.state == DRAINING:
                continue
            spec = deployment.spec_of(replica.revision)  # its own revision's, not the newest
            artifact_digest, artifact_source = spec.model.artifact()
            pipeline_args = self._pipeline_args(replica)
            if pipeline_args is None:
                continue  # a split pipeline's leader waits until its remote steps are ready
            models = replica.models or [spec.model.name]
            env = {} if node in self._no_secrets else dict(spec.env)
            needs = replica_needs(self.cluster, replica)
            assignments.replicas.add(
                replica_id=replica.id, deployment=replica.deployment, revision=replica.revision,
                model_repository=spec.model.repository, model_name=models[0], gpu_indices=replica.gpu_indices,
                env={**env,
                     # what the replica may use on each of its GPUs (the fake GPU probe counts it)
                     GPU_MEMORY_ENV: str(replica.gpu_memory_bytes),
                     CPU_ENV: f"{needs.cpu:g}",             # checked by the host policy, limited by the agent
                     MEMORY_ENV: str(needs.memory)},        # the agent's memory limit for the replica
                runtime_args=[*spec.runtime_args, *pipeline_args],
                artifact_digest=artifact_digest, artifact_source=artifact_source,
            )
        return assignments

    def _pipeline_args(self, replica) -> list[str] | None:
        """The extra runtime flags of a pipeline replica: ``--model`` for each further model it
        serves, ``--remote-model MODEL=ADDRESS`` for each step served elsewhere; None while a
        remote step has no ready address yet."""
        args = [flag for model in replica.models[1:] for flag in ("--model", model)]
        for model, replica_id in sorted(replica.remote.items()):
            step = self.cluster.replicas.get(replica_id)
            if step is None or step.state != READY or not step.address:
                return None
            args += ["--remote-model", f"{model}={step.address}"]
        return args

    def _push_assignments(self, only: str | None = None) -> None:
        for name, channel in list(self._node_channels.items()):
            if only and name != only:
                continue
            assignments = self.assignments_for(name)
            fingerprint = assignments.SerializeToString(deterministic=True)
            if self._sent_assignments.get(name) == fingerprint:
                continue
            self._sent_assignments[name] = fingerprint
            self._assignment_version += 1
            assignments.version = self._assignment_version
            channel.put_nowait(mesh.SchedulerMessage(assignments=assignments))

    # -- routes --------------------------------------------------------------

    def route_table(self) -> mesh.RouteTable:
        """One route per ready revision of each deployment. During a canary the canary's route
        weighs canary_weight and the stable one the rest; otherwise a route weighs its number
        of ready replicas, so every ready replica gets an equal share.

        A lost replica (its node stopped reporting) counts as ready until it is replaced: the
        proxies' health checks, not the scheduler, decide whether it still answers. A deployment
        with nothing routable has one route without endpoints (its current revision, weight 0),
        so a proxy knows the model and answers UNAVAILABLE, never NOT_FOUND."""
        table = mesh.RouteTable()
        for name in sorted(self.cluster.deployments):
            deployment = self.cluster.deployments[name]
            ready = [r for r in self.cluster.replicas_of(name)
                     if r.state in (READY, LOST) and r.address and r.leads]
            if not ready:
                table.routes.add(model=deployment.spec_of(deployment.revision).model.name, deployment=name,
                                 revision=deployment.revision, weight=0, **_idle_route_fields(deployment))
            for revision in sorted({r.revision for r in ready}):
                endpoints = [r for r in ready if r.revision == revision]
                if deployment.canary_active and revision in (deployment.revision, deployment.stable_revision):
                    canary = deployment.canary_weight
                    weight = canary if revision == deployment.revision else 100 - canary
                else:
                    weight = len(endpoints)
                route = table.routes.add(model=deployment.spec_of(revision).model.name, deployment=name,
                                         revision=revision, weight=weight)
                for replica in endpoints:
                    route.endpoints.add(replica_id=replica.id, address=replica.address, node=replica.node)
        return table

    def _publish_routes(self) -> None:
        table = self.route_table()
        if table.routes == self._route_table.routes:
            return
        table.version = self._route_table.version + 1
        table.cluster_id = self.cluster_id
        self._route_table = table
        for queue in self._route_watchers:
            queue.put_nowait(table)

    @property
    def published_routes(self) -> mesh.RouteTable:
        """The route table last sent to the proxies (do not modify it)."""
        return self._route_table

    def watch_routes(self) -> asyncio.Queue:
        """A queue of complete tables, the current one first; None when this scheduler stops leading."""
        self.require_leader()
        queue: asyncio.Queue = asyncio.Queue()
        self._route_table.cluster_id = self.cluster_id
        queue.put_nowait(self._route_table)
        self._route_watchers.add(queue)
        return queue

    def unwatch_routes(self, queue: asyncio.Queue) -> None:
        self._route_watchers.discard(queue)

    def node_is_lost(self, name: str) -> bool:
        node = self.cluster.nodes.get(name)
        return node is not None and node.state == NODE_LOST


def _idle_route_fields(deployment: DeploymentRecord) -> dict:
    """For a deployment with nothing routable: whether a proxy may wake it, and why it has no replica."""
    autoscaling = deployment.spec.autoscaling
    if autoscaling is not None and autoscaling.min_replicas == 0:   # held at the proxies while a replica starts
        return {"wakes_on_call": True, "no_endpoint_reason": "scaled to zero while idle" if deployment.replicas == 0
                else "starting from zero"}
    if deployment.replicas > 0:
        return {}
    return {"no_endpoint_reason": f"deployment '{deployment.name}' is scaled to 0 replicas and has no "
                                  f"autoscaling (scheduler ctl scale {deployment.name} N)"}
