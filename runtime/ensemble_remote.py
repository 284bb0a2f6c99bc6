"""Ensemble steps served by another replica (``--remote-model NAME=HOST:PORT``).

A pipeline split across hosts runs each part in its own runtime; the
replica serving the ensemble reaches the step models it does not hold over
the KServe v2 protocol with ``clients.AsyncInferenceClient`` (one channel per
address, shared by every step and request). A model named here is never
loaded locally. Remote calls carry no deadline of their own: the ensemble
request's cancellation (its caller gone) cancels them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np

from meshserve.clients import AsyncInferenceClient
from meshserve.common.security.tls import TlsConfig
from meshserve.protos.inference import model_config_pb2 as mc

from .ensemble_trace import current
from .request import EMPTY_FINAL_PARAMETER, InferRequest

# Reading a remote step model's config at ensemble load: long enough for a
# replica that is still starting on a loaded host, short enough that a wrong
# address fails the load visibly instead of hanging it.
CONFIG_TIMEOUT_S = 30.0


def parse_remote_model(text: str) -> tuple[str, str]:
    """``NAME=HOST:PORT`` -> (name, address); ValueError naming the problem."""
    name, sep, address = text.partition("=")
    host, colon, port = address.rpartition(":")
    if not sep or not name or not colon or not host or not port.isdigit():
        raise ValueError(f"--remote-model {text!r}: expected NAME=HOST:PORT")
    return name, address


class RemoteModels:
    """Which models live on which replica, and the clients that reach them."""

    def __init__(self, addresses: dict[str, str] | None = None, tls: TlsConfig | None = None):
        self._addresses = dict(addresses or {})
        self._tls = tls or TlsConfig()   # the runtime's own settings: a remote step is a mesh hop
        self._clients: dict[str, AsyncInferenceClient] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._addresses

    def __iter__(self):
        return iter(self._addresses)

    def address(self, name: str) -> str:
        return self._addresses[name]

    def client(self, name: str) -> AsyncInferenceClient:
        """The (lazily opened) client of ``name``'s replica; call on the serving event loop."""
        address = self._addresses[name]
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = AsyncInferenceClient(address, tls=self._tls)
        return client

    async def config(self, name: str, version: str) -> mc.ModelConfig:
        response = await self.client(name).model_config(name, version or None, timeout=CONFIG_TIMEOUT_S)
        return response.config

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()


def _forwarded_parameters(request: InferRequest) -> dict:
    return {key: value for key, value in request.parameters.items()
            if value is not None and key != EMPTY_FINAL_PARAMETER}


class RemoteStep:
    """Runs one step on the replica that serves its model."""

    def __init__(self, remote: RemoteModels, model: str, version: str):
        self.remote = remote
        self.model = model
        self.version = version
        self.where = remote.address(model)

    async def infer(self, inputs: dict[str, np.ndarray], request: InferRequest, trace) -> dict[str, np.ndarray]:
        with current(trace):  # the client's span (and traceparent) continue the step's span
            return await self.remote.client(self.model).infer(
                self.model, inputs, version=self.version or None, request_id=request.id or None,
                parameters=_forwarded_parameters(request))

    async def stream(self, inputs: dict[str, np.ndarray], request: InferRequest,
                     trace) -> AsyncIterator[dict[str, np.ndarray]]:
        with current(trace):  # the stream's span is opened here, under the step's span
            responses = self.remote.client(self.model).stream(
                self.model, inputs, version=self.version or None, request_id=request.id or None,
                parameters=_forwarded_parameters(request))
        async with responses:
            async for outputs in responses:
                yield outputs

