"""The route table the proxy serves from: an immutable snapshot of ``mesh.RouteTable``.

A snapshot is replaced whole, never edited, so a request that looked up its
routes keeps a consistent view while a new table arrives. Endpoints are
identified by address: one replica is one address.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.protos.mesh import control_pb2 as mesh


@dataclass(frozen=True)
class EndpointInfo:
    replica_id: str
    address: str
    node: str


@dataclass(frozen=True)
class Route:
    """One deployment revision serving ``model``; gets ``weight`` of the model's traffic."""

    model: str
    version: str          # "" serves whatever versions the replicas have
    deployment: str
    revision: int
    weight: int
    endpoints: tuple[EndpointInfo, ...]
    wakes_on_call: bool = False      # scaled to zero: hold calls and ask for a replica (proxy/cold_start.py)
    no_endpoint_reason: str = ""     # why there is no endpoint, when that is by design


class RouteTable:
    def __init__(self, routes: list[Route], version: int = 0):
        self.version = version
        self.routes = tuple(routes)
        self._by_model: dict[str, list[Route]] = {}
        for route in self.routes:
            self._by_model.setdefault(route.model, []).append(route)

    @classmethod
    def from_proto(cls, table: mesh.RouteTable) -> RouteTable:
        return cls([
            Route(model=r.model, version=r.version, deployment=r.deployment, revision=r.revision,
                  weight=r.weight,
                  endpoints=tuple(EndpointInfo(e.replica_id, e.address, e.node) for e in r.endpoints),
                  wakes_on_call=r.wakes_on_call, no_endpoint_reason=r.no_endpoint_reason)
            for r in table.routes
        ], version=table.version)

    def models(self) -> list[str]:
        return sorted(self._by_model)

    def routes_for(self, model: str, version: str = "") -> list[Route]:
        """Routes that may serve ``model`` at ``version``: exact version matches first choice,
        else routes that name no version (the replica then answers for the version)."""
        routes = self._by_model.get(model, [])
        if not version:
            return list(routes)
        exact = [r for r in routes if r.version == version]
        return exact or [r for r in routes if not r.version]

    def endpoints(self) -> dict[str, EndpointInfo]:
        """Every endpoint of the table, by address."""
        return {e.address: e for route in self.routes for e in route.endpoints}
