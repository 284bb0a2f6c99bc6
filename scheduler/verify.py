"""Checking an agent's claim before routing: is the replica it reports ready really serving its model?

What an agent reports is a claim (a rogue agent reported its own address as
a replica's and received a share of the traffic). Before a replica counts as
ready in the route table, the scheduler calls the reported address itself:
``ModelReady`` of the model the replica was assigned. Only a yes routes it.

Guarantees: one call per claim (a replica turning ready, or ready at a new
address), bounded by ``VERIFY_TIMEOUT_S``; a refused claim is not checked
again for ``RETRY_AFTER_S`` (an agent repeating it costs one call per that
interval), and the replica's reason says why it is not routed. With TLS the
call verifies the replica's certificate against the cluster CA, so only a
replica with a certificate of the cluster can pass.
"""

from __future__ import annotations

from typing import Protocol

import grpc

from meshserve.common.security.tls import TlsConfig, aio_channel
from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc

# A replica its agent just saw SERVING answers ModelReady in milliseconds; 2 s covers a loaded host,
# and bounds how long one claim holds up the reporting agent's stream.
VERIFY_TIMEOUT_S = 2.0
# A claim that failed is checked again after this long (a replica may have been slow to open its port).
RETRY_AFTER_S = 5.0


class ReplicaVerifier(Protocol):
    async def problem(self, address: str, model: str) -> str:
        """Why ``address`` cannot be routed as a replica of ``model``; "" when it serves it."""


class GrpcReplicaVerifier:
    """Asks the replica itself, over gRPC (TLS when the scheduler has it)."""

    def __init__(self, tls: TlsConfig | None = None, timeout_s: float = VERIFY_TIMEOUT_S):
        self.tls = tls
        self.timeout_s = timeout_s

    async def problem(self, address: str, model: str) -> str:
        try:
            async with aio_channel(address, self.tls) as channel:
                answer = await pb_grpc.GRPCInferenceServiceStub(channel).ModelReady(
                    pb.ModelReadyRequest(name=model), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as err:
            return f"reported ready at {address}, which did not answer ModelReady('{model}'): " \
                   f"{err.code().name}: {(err.details() or '')[:200]}"
        if not answer.ready:
            return f"reported ready at {address}, which does not serve model '{model}'"
        return ""
