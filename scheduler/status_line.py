"""The scheduler's one-line state for ``systemctl status`` (systemd's STATUS=): its role, and as leader
how many nodes and replicas are ready out of how many, and how many routes the proxies are given."""

from __future__ import annotations

from .core import SchedulerCore
from .records import NODE_READY, READY


def scheduler_status(core: SchedulerCore | None) -> str:
    if core is None:
        return "starting"
    if not core.leading:
        return f"standby; leader {core.leader_hint or 'not known yet'}"
    cluster = core.cluster
    nodes_ready = sum(1 for node in cluster.nodes.values() if node.state == NODE_READY)
    wanted = sum(deployment.replicas for deployment in cluster.deployments.values())
    ready = sum(1 for replica in cluster.replicas.values() if replica.state == READY)
    routes = core.published_routes
    endpoints = sum(len(route.endpoints) for route in routes.routes)
    return (f"leader; nodes {nodes_ready}/{len(cluster.nodes)} ready; replicas {ready}/{wanted} ready "
            f"in {len(cluster.deployments)} deployment(s); {len(routes.routes)} route(s) to {endpoints} "
            f"endpoint(s), version {routes.version}")
