"""The mesh's front proxy: ``inference.GRPCInferenceService`` in front of the replicas.

``ProxyServer(ProxyOptions(...))`` runs it in-process; ``mesh-proxy`` (or
``python -m meshserve.proxy``) from the command line. See ``server.py`` for the
lifecycle and each module's docstring for its guarantees.
"""

from .routes import EndpointInfo, Route, RouteTable
from .server import ProxyOptions, ProxyServer

__all__ = ["EndpointInfo", "ProxyOptions", "ProxyServer", "Route", "RouteTable"]
