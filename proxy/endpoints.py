"""Replicas as the proxy sees them: a few channels each, outstanding requests, in or out of rotation.

Guarantees:
- ``channels`` ``grpc.aio`` channels per replica address, each its own
  HTTP/2 connection, shared by every request to it (calls take them in
  turn); balancing is per request, not per connection.
- ``outstanding`` counts the calls and streams now running on (or waiting
  for) the replica; the balancer reads it.
- ``admission`` bounds the unary calls running on the replica at once and
  those waiting for it (``proxy.admission``); streams are long-lived and
  are not counted there.
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
import functools
import itertools
import logging
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.common.backoff import Backoff
from meshserve.common.security.tls import TlsConfig, aio_channel

from .admission import Admission
from .routes import EndpointInfo, RouteTable

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
# Longer than the runtime's default drain grace period (30 s): a replica the
# scheduler drains finishes its calls before the proxy closes its channel.
RETIRED_GRACE_S = 35.0
# A dead replica's address is re-probed quickly (it may be restarted at the
# same address) but at most every 2 s, so a long outage costs little.
HEALTH_BACKOFF = Backoff(initial_s=0.05, max_s=2.0)


# Unary calls at once per replica through one proxy. grpc core's server queues
# at most 1,000 calls its application has not picked up yet and sheds the
# rest as a bare CANCELLED (the 696 of 3,000 of issue 8, item 10); 128 keeps
# several proxies in front of one replica under that, and is far more than a
# replica runs at once (its batcher's largest batch), so none is starved.
MAX_CALLS_PER_REPLICA = 128
# Calls waiting for a replica beyond those: a burst of a few thousand calls at
# once waits its turn within each call's deadline instead of failing ...
MAX_QUEUED_PER_REPLICA = 4096
# ... as long as what the waiting requests hold in the proxy's memory stays
# bounded (requests may be up to the 256 MiB message limit each).
MAX_QUEUED_BYTES_PER_REPLICA = 1024 * 1024 * 1024


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        # Each channel its own connection: without this, channels with equal
        # arguments share one subchannel (one TCP connection) process-wide.
        ("grpc.use_local_subchannel_pool", 1),
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

    def __init__(self, info: EndpointInfo, max_message_bytes: int, channels: int = 1, tls: TlsConfig | None = None):
        self.info = info
        self.address = info.address
        self.channels = [aio_channel(info.address, tls, options=channel_options(max_message_bytes))
                         for _ in range(channels)]
        self.channel = self.channels[0]   # health watch and statistics
        self.admission = Admission(MAX_CALLS_PER_REPLICA, MAX_QUEUED_PER_REPLICA, MAX_QUEUED_BYTES_PER_REPLICA)
        self.outstanding = 0
        self.healthy = True          # the scheduler listed it as ready
        self._watch_call: grpc.aio.UnaryStreamCall | None = None
        self._watcher: asyncio.Task | None = None
        self._methods: dict[tuple[str, bool, int], object] = {}
        self._turn = itertools.cycle(range(channels))

    def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch_health(), name=f"health {self.address}")

    def unary(self, method: str):
        """A raw-bytes unary callable for ``method`` (identity serializers), on the next channel."""
        return self._callable(method, False)

    def stream(self, method: str):
        """A raw-bytes bidirectional stream callable for ``method``, on the next channel."""
        return self._callable(method, True)

    def _callable(self, method: str, streaming: bool):
        key = (method, streaming, next(self._turn))
        if key not in self._methods:
            channel = self.channels[key[2]]
            make = channel.stream_stream if streaming else channel.unary_unary
            self._methods[key] = make(f"/{SERVICE_NAME}/{method}")
        return self._methods[key]

    def mark_failed(self) -> None:
        """Out of rotation now; the health watch re-opens and puts it back once SERVING."""
        if self.healthy:
            log.info("replica %s at %s out of rotation", self.info.replica_id, self.address)
        self.healthy = False
        if self._watch_call is not None:
            self._watch_call.cancel()  # the next watch reports the current status afresh

    async def _watch_health(self) -> None:
        stub: Any = health_pb2_grpc.HealthStub(self.channel)   # Any: the health stubs declare no methods on it
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
                current = asyncio.current_task()
                if current is not None and current.cancelling():
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
        await asyncio.gather(*(channel.close(grace) for channel in self.channels))


class EndpointPool:
    """The endpoints of the current route table, by address; follows table updates."""

    def __init__(self, max_message_bytes: int, channels_per_replica: int = 1, tls: TlsConfig | None = None):
        self.max_message_bytes = max_message_bytes
        self.channels_per_replica = channels_per_replica
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
                endpoint = self._endpoints[address] = Endpoint(info, self.max_message_bytes,
                                                               self.channels_per_replica, self.tls)
                endpoint.start()
            else:
                endpoint.info = info
        for address in [a for a in self._endpoints if a not in wanted]:
            endpoint = self._endpoints.pop(address)
            task = self._retiring[endpoint] = asyncio.create_task(endpoint.close(RETIRED_GRACE_S))
            task.add_done_callback(functools.partial(self._forget_retired, endpoint))

    def _forget_retired(self, endpoint: Endpoint, _task: asyncio.Task) -> None:
        self._retiring.pop(endpoint, None)

    async def close(self) -> None:
        """Close every channel now, the retiring ones too (their calls are cancelled)."""
        endpoints, self._endpoints = [*self._endpoints.values(), *self._retiring], {}
        for task in list(self._retiring.values()):
            task.cancel()
        await asyncio.gather(*(e.close(None) for e in endpoints), return_exceptions=True)
