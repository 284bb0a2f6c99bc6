"""Replicas as the proxy sees them: one channel each, outstanding requests, in or out of rotation.

Guarantees:
- One ``grpc.aio`` channel per replica address, shared by every request to
  it (HTTP/2 multiplexes them); balancing is per request, not per connection.
- ``outstanding`` counts the calls and streams now running on the replica;
  the balancer reads it.
- A replica is in rotation until it fails (``mark_failed``, called at once
  by the forwarder) or its ``grpc.health.v1`` status leaves SERVING (a
  draining replica says so before it stops taking calls). It comes back
  only when a health check says SERVING again. One background health watch
  per replica, re-opened with capped backoff, keeps this bounded: at most
  one outstanding health RPC per replica.
- A replica dropped from the route table is closed after a grace period,
  so calls and streams already running on it can finish.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.backoff import Backoff
from protos.security.tls import TlsConfig, aio_channel

from .routes import EndpointInfo, RouteTable

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
# Longer than the runtime's default drain grace period (30 s): a replica the
# scheduler drains finishes its calls before the proxy closes its channel.
RETIRED_GRACE_S = 35.0
# A dead replica's address is re-probed quickly (it may be restarted at the
# same address) but at most every 2 s, so a long outage costs little.
HEALTH_BACKOFF = Backoff(initial_s=0.05, max_s=2.0)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # gRPC's default reconnect backoff starts at 1 s and grows to 120 s; a
        # replica restarted at the same address should be usable within ~2 s.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


class Endpoint:
    """One replica: its channel, its load and its health."""

    def __init__(self, info: EndpointInfo, max_message_bytes: int, tls: TlsConfig | None = None):
        self.info = info
        self.address = info.address
        self.channel = aio_channel(info.address, tls, options=channel_options(max_message_bytes))
        self.outstanding = 0
        self.healthy = True          # the scheduler listed it as ready
        self._watch_call = None
        self._watcher: asyncio.Task | None = None
        self._methods: dict[tuple[str, bool], object] = {}

    def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch_health(), name=f"health {self.address}")

    def unary(self, method: str):
        """A raw-bytes unary callable for ``method`` (identity serializers)."""
        key = (method, False)
        if key not in self._methods:
            self._methods[key] = self.channel.unary_unary(f"/{SERVICE_NAME}/{method}")
        return self._methods[key]

    def stream(self, method: str):
        """A raw-bytes bidirectional stream callable for ``method``."""
        key = (method, True)
        if key not in self._methods:
            self._methods[key] = self.channel.stream_stream(f"/{SERVICE_NAME}/{method}")
        return self._methods[key]

    def mark_failed(self) -> None:
        """Out of rotation now; the health watch re-opens and puts it back once SERVING."""
        if self.healthy:
            log.info("replica %s at %s out of rotation", self.info.replica_id, self.address)
        self.healthy = False
        if self._watch_call is not None:
            self._watch_call.cancel()  # the next watch reports the current status afresh

    async def _watch_health(self) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
        failures = 0
        while True:
            self._watch_call = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            try:
                async for response in self._watch_call:
                    serving = response.status == health_pb2.HealthCheckResponse.SERVING
                    if serving != self.healthy:
                        log.info("replica %s at %s %s", self.info.replica_id, self.address,
                                 "back in rotation" if serving else "not serving: out of rotation")
                    self.healthy = serving
                    failures = 0
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise  # closing; else mark_failed cancelled the watch call: watch again
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return  # no health service: only failed calls take it out (and nothing puts it back)
                if err.code() != grpc.StatusCode.CANCELLED:
                    self.healthy = False
            finally:
                self._watch_call = None
            failures += 1
            await asyncio.sleep(HEALTH_BACKOFF.delay(failures))

    async def close(self, grace: float | None = None) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._watch_call is not None:
            self._watch_call.cancel()
        await self.channel.close(grace)


class EndpointPool:
    """The endpoints of the current route table, by address; follows table updates."""

    def __init__(self, max_message_bytes: int, tls: TlsConfig | None = None):
        self.max_message_bytes = max_message_bytes
        self.tls = tls          # read when an endpoint opens: a replica added after a rotation uses the new files
        self._endpoints: dict[str, Endpoint] = {}
        self._retiring: dict[Endpoint, asyncio.Task] = {}

    def get(self, address: str) -> Endpoint | None:
        return self._endpoints.get(address)

    def all(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    def update(self, table: RouteTable) -> None:
        """Open endpoints new in ``table``; retire (close after a grace) those no longer in it."""
        wanted = table.endpoints()
        for address, info in wanted.items():
            endpoint = self._endpoints.get(address)
            if endpoint is None:
                endpoint = self._endpoints[address] = Endpoint(info, self.max_message_bytes, self.tls)
                endpoint.start()
            else:
                endpoint.info = info
        for address in [a for a in self._endpoints if a not in wanted]:
            endpoint = self._endpoints.pop(address)
            task = self._retiring[endpoint] = asyncio.create_task(endpoint.close(RETIRED_GRACE_S))
            task.add_done_callback(lambda _, e=endpoint: self._retiring.pop(e, None))

    async def close(self) -> None:
        """Close every channel now, the retiring ones too (their calls are cancelled)."""
        endpoints, self._endpoints = [*self._endpoints.values(), *self._retiring], {}
        for task in list(self._retiring.values()):
            task.cancel()
        await asyncio.gather(*(e.close(None) for e in endpoints), return_exceptions=True)
