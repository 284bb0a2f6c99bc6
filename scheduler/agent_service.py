"""``mesh.AgentService``: one bidirectional stream per node agent.

A stream ends when the agent closes it, when the node is deleted, or when
this scheduler stops leading: then with FAILED_PRECONDITION naming the
leader, as a standby refuses a new stream. A second stream for a node that
is connected is refused (scheduler/core.py).

When authentication is on, an agent is the node its identity names: a
Register with an empty node name takes the identity's NAME, one naming
another node is refused with PERMISSION_DENIED (an admin may register any).
"""

from __future__ import annotations

import asyncio

from meshserve.common.errors import InvalidArgument, PermissionDenied
from meshserve.common.security.auth import Authenticator
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.protos.mesh import control_pb2_grpc as mesh_grpc

from .agent_channel import carries_secrets
from .core import SchedulerCore

# How long an agent may take to say who it is after opening its stream.
REGISTER_TIMEOUT_S = 10.0


class AgentService(mesh_grpc.AgentServiceServicer):
    def __init__(self, core: SchedulerCore, auth: Authenticator | None = None):
        self.core = core
        self.auth = auth or Authenticator()

    async def Connect(self, request_iterator, context):
        self.core.require_leader()
        messages = request_iterator.__aiter__()
        try:
            async with asyncio.timeout(REGISTER_TIMEOUT_S):
                first = await messages.__anext__()
        except (StopAsyncIteration, TimeoutError):
            raise InvalidArgument("an agent stream must start with a Register message") from None
        if first.WhichOneof("kind") != "register":
            raise InvalidArgument(f"an agent stream must start with Register, not {first.WhichOneof('kind')}")
        name = self._node_name(first.register, context)
        channel = await self.core.register(first.register, carries_secrets=carries_secrets(context))

        async def read_reports() -> None:
            try:
                async for message in messages:
                    kind = message.WhichOneof("kind")
                    if kind == "report":
                        await self.core.report(name, message.report)
                    elif kind == "logs":
                        self.core.log_relay.deliver(name, channel, message.logs)
            finally:
                channel.put_nowait(None)

        reader = asyncio.create_task(read_reports(), name=f"agent-{name}")
        try:
            yield mesh.SchedulerMessage(registered=mesh.Registered(
                node_name=name, scheduler_id=self.core.scheduler_id, cluster_id=self.core.cluster_id,
                report_interval_ms=int(self.core.report_interval_s * 1000),
                heartbeat_timeout_ms=int(self.core.heartbeat_timeout_s * 1000),
            ))
            while (message := await channel.get()) is not None:
                yield message
            self.core.require_leader()     # ended by a step-down: say so, and name the leader
        finally:
            reader.cancel()
            self.core.disconnect(name, channel)

    def _node_name(self, register: mesh.Register, context) -> str:
        """The node this stream speaks for: its identity's name when authentication is on."""
        if not self.auth.enabled:
            return register.node_name
        who = self.auth.identify(context)
        if who.role != "agent":
            return register.node_name      # an admin (the interceptor admits no one else)
        if not register.node_name:
            register.node_name = who.name
        elif register.node_name != who.name:
            raise PermissionDenied(f"{who} may register only as node {who.name!r}, not {register.node_name!r}")
        return who.name
