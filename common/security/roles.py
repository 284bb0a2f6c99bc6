"""Who may call what: one table, gRPC method -> roles allowed, for every meshserve server.

Roles are those of ``identity.ROLES``. Guarantees:

- ``admin`` may call everything; every other role only what the table
  names. A method the table does not name is admin-only (default deny).
- The control plane (scheduler) is fixed: admin changes the mesh, viewer
  reads it, agent holds a node's stream, proxy follows routes.
- The data plane (runtime, proxy) is split into endpoint groups, as Triton's
  restricted protocols are: each group's roles can be replaced per server
  (``--restrict GROUP=ROLE[,ROLE]``). By default clients, proxies and agents
  (a replica calls the steps of its pipeline with its node's certificate)
  infer and read metadata and health; the scheduler reads health and
  metadata (it checks replicas before routing them); model repository
  control, shared memory and trace/log settings are admin-only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .identity import ROLES, check_role

ADMIN = "admin"

_ADMIN = "/mesh.AdminService/"
_INFERENCE = "/inference.GRPCInferenceService/"
_HEALTH = "/grpc.health.v1.Health/"

# Mutating admin calls: admin only, and each one is audited (scheduler/audit.py).
MUTATING_ADMIN_METHODS = frozenset(_ADMIN + name for name in (
    "Apply", "Delete", "Scale", "Promote", "Rollback", "Cordon", "Uncordon", "Drain", "DeleteNode"))

CONTROL_PLANE: dict[str, frozenset[str]] = {
    **{method: frozenset() for method in MUTATING_ADMIN_METHODS},
    # ReplicaLogs: a replica's output is what `describe` already shows the tail of.
    **{_ADMIN + name: frozenset({"viewer"}) for name in ("Get", "Describe", "Explain", "ReplicaLogs")},
    # Who leads is no secret: ctl, agents and proxies ask it to find the leader.
    _ADMIN + "Leader": frozenset({"viewer", "agent", "proxy", "scheduler"}),
    "/mesh.AgentService/Connect": frozenset({"agent"}),
    "/mesh.RouteService/WatchRoutes": frozenset({"proxy"}),
    # A proxy holding a call for a model scaled to zero asks for a replica.
    "/mesh.RouteService/Wake": frozenset({"proxy"}),
    # Model bundles: ctl (admin) uploads them, agents fetch them.
    "/mesh.ArtifactService/Upload": frozenset(),
    "/mesh.ArtifactService/Stat": frozenset(),
    "/mesh.ArtifactService/Download": frozenset({"agent"}),
}

# Data plane endpoint groups: group -> its methods.
GROUPS: dict[str, tuple[str, ...]] = {
    "inference": tuple(_INFERENCE + m for m in ("ModelInfer", "ModelStreamInfer")),
    "metadata": tuple(_INFERENCE + m for m in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                               "ModelMetadata", "ModelConfig")),
    "health": (_HEALTH + "Check", _HEALTH + "Watch"),
    "statistics": (_INFERENCE + "ModelStatistics",),
    "model-repository": tuple(_INFERENCE + m for m in ("RepositoryIndex", "RepositoryModelLoad",
                                                       "RepositoryModelUnload")),
    "shared-memory": tuple(_INFERENCE + f"{kind}SharedMemory{verb}" for kind in ("System", "Cuda")
                           for verb in ("Status", "Register", "Unregister")),
    "settings": (_INFERENCE + "TraceSetting", _INFERENCE + "LogSettings"),
    "load": ("/mesh.ReplicaService/WatchLoad",),
}
DEFAULT_GROUP_ROLES: dict[str, frozenset[str]] = {
    "inference": frozenset({"client", "proxy", "agent"}),
    "metadata": frozenset({"client", "proxy", "agent", "scheduler"}),
    "health": frozenset({"client", "proxy", "agent", "scheduler"}),
    "statistics": frozenset({"client", "proxy"}),
    "model-repository": frozenset(),
    "shared-memory": frozenset(),
    "settings": frozenset(),
    "load": frozenset({"agent"}),   # the node agent carries it to the autoscaler
}


class RoleTable:
    """``method -> roles`` with admin implied everywhere; built once per server."""

    def __init__(self, allowed: Mapping[str, Iterable[str]]):
        self._allowed = {method: frozenset(roles) | {ADMIN} for method, roles in allowed.items()}

    def roles_for(self, method: str) -> frozenset[str]:
        """The roles that may call ``method`` (only admin for a method the table does not name)."""
        return self._allowed.get(method, frozenset({ADMIN}))

    def allows(self, role: str, method: str) -> bool:
        return role in self.roles_for(method)


def control_plane_table() -> RoleTable:
    """The scheduler's table."""
    return RoleTable(CONTROL_PLANE)


def data_plane_table(restrict: Mapping[str, Iterable[str]] | None = None) -> RoleTable:
    """A runtime's or proxy's table: the default roles of each group, with ``restrict``'s groups replaced."""
    roles = {**DEFAULT_GROUP_ROLES, **{group: frozenset(r) for group, r in (restrict or {}).items()}}
    return RoleTable({method: roles[group] for group, methods in GROUPS.items() for method in methods})


def parse_restrict(values: Iterable[str]) -> dict[str, frozenset[str]]:
    """``["inference=client,proxy", "shared-memory=admin"]`` -> {group: roles}; ValueError naming the problem.

    ``GROUP=`` (no role) leaves the group to admin alone.
    """
    restrict: dict[str, frozenset[str]] = {}
    for value in values:
        group, sep, roles = value.partition("=")
        group = group.strip()
        if not sep or group not in GROUPS:
            raise ValueError(f"--restrict {value!r}: expected GROUP=ROLE[,ROLE...] with GROUP one of "
                             f"{', '.join(GROUPS)}")
        try:
            restrict[group] = frozenset(check_role(r.strip()) for r in roles.split(",") if r.strip())
        except ValueError as err:
            raise ValueError(f"--restrict {value!r}: {err}") from None
    return restrict


__all__ = ["ADMIN", "CONTROL_PLANE", "DEFAULT_GROUP_ROLES", "GROUPS", "MUTATING_ADMIN_METHODS", "ROLES",
           "RoleTable", "control_plane_table", "data_plane_table", "parse_restrict"]
