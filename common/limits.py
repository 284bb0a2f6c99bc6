"""What one client may make a daemon hold: the gRPC server limits of every meshserve server.

One place for the defaults, each with the reason for its value; every server
(runtime, proxy, scheduler) builds its options with ``server_options``. A
client past a limit gets a clear answer and the server keeps serving others:

- a message over ``max_message_bytes``: RESOURCE_EXHAUSTED (gRPC), never read
  into memory;
- more concurrent calls on one HTTP/2 connection than
  ``max_streams_per_connection``: the server advertises the limit
  (SETTINGS_MAX_CONCURRENT_STREAMS), a gRPC client holds the extra calls
  until a stream ends (within their deadlines), a client that ignores the
  setting has them refused (REFUSED_STREAM), and other connections are
  unaffected;
- keepalive pings more often than ``min_ping_interval_ms`` without data: after
  ``MAX_PING_STRIKES`` such pings the connection is closed (GOAWAY
  ``too_many_pings``);
- calls the application has not picked up yet: at most ``max_pending_requests``
  queued in gRPC core, the rest refused (a bounded queue, not memory).
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024

# Triton accepts messages up to 2 GiB; 256 MiB fits large image batches and still refuses a runaway
# client with RESOURCE_EXHAUSTED before it costs memory (runtime and proxy: the data plane).
DATA_PLANE_MAX_MESSAGE_BYTES = 256 * MIB
# The control plane carries specs, assignments, route tables and reports: kilobytes. gRPC's own
# default receive limit (4 MiB) leaves room for a cluster of thousands of replicas in one table.
CONTROL_PLANE_MAX_MESSAGE_BYTES = 4 * MIB

# Clients burst: 3,000 calls at once through the proxy on one connection (gRPC shares a connection
# between a process's channels to one address; tests/test_proxy_admission.py) must all be answered, and a
# client that starts calls before it has read the server's limit gets the excess refused (REFUSED_STREAM,
# UNAVAILABLE). The proxy sends every call to a replica over one connection too (128 unary calls at once,
# MAX_CALLS_PER_REPLICA, plus pinned streams). 4,096 covers both; past it one connection cannot go, so
# one client holds at most that many handler tasks and HTTP/2 streams (a few KiB each).
DATA_PLANE_MAX_STREAMS_PER_CONNECTION = 4096
# An agent holds one stream, a proxy one route watch and a liveness call, ctl a call or two; the
# in-process agents and proxies of ``scheduler dev`` share one connection (gRPC shares subchannels).
CONTROL_PLANE_MAX_STREAMS_PER_CONNECTION = 256

# Node agents ping the scheduler every 2 s (node_agent/agent.py KEEPALIVE_TIME_MS) to notice a silent
# one, and gRPC clients ping at most once a second whatever they are set to; half a second lets every
# one of them (with timer jitter), and strikes a client pinging in a loop. The data plane's clients
# keep their connections busy with calls; a keepalive more often than every 10 s only costs the server.
CONTROL_PLANE_MIN_PING_INTERVAL_MS = 500
DATA_PLANE_MIN_PING_INTERVAL_MS = 10_000
# gRPC core's default: a third ping too early closes the connection.
MAX_PING_STRIKES = 2

# gRPC core queues calls its application has not picked up yet, at most 1,000 by default, and sheds the
# rest with a bare CANCELLED. The runtime picks calls up at once (its batcher queues them), the
# scheduler's calls are few: gRPC's bound stands. The proxy raises it (proxy/server.py FRONT_DOOR_*).
DEFAULT_MAX_PENDING_REQUESTS = 1000


@dataclass(frozen=True)
class ServerLimits:
    max_message_bytes: int
    max_streams_per_connection: int
    min_ping_interval_ms: int
    max_pending_requests: int = DEFAULT_MAX_PENDING_REQUESTS

    def server_options(self) -> list[tuple[str, int]]:
        """gRPC server options enforcing these limits."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            # (gRPC core's GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS)
            ("grpc.http2.min_ping_interval_without_data_ms", self.min_ping_interval_ms),
            ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.server.max_pending_requests", self.max_pending_requests),
        ]


DATA_PLANE = ServerLimits(DATA_PLANE_MAX_MESSAGE_BYTES, DATA_PLANE_MAX_STREAMS_PER_CONNECTION,
                          DATA_PLANE_MIN_PING_INTERVAL_MS)
CONTROL_PLANE = ServerLimits(CONTROL_PLANE_MAX_MESSAGE_BYTES, CONTROL_PLANE_MAX_STREAMS_PER_CONNECTION,
                             CONTROL_PLANE_MIN_PING_INTERVAL_MS)
