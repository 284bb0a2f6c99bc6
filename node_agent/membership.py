"""Which cluster this node belongs to: the cluster id of the first scheduler it joined, kept on disk.

A scheduler tells every agent the cluster id of its store (``Registered.cluster_id``,
scheduler/store/identity.py). A scheduler started on an empty or wrong store
has another id: it would otherwise look like a cluster that wants nothing
running here, and the agent would drain every replica. Guarantees:

- The first non-empty id an agent is told is remembered, in ``path`` (JSON,
  written atomically: a temporary file renamed over the old one), and
  survives agent restarts.
- ``check`` refuses any other id with ``ForeignCluster`` (the agent then keeps
  its replicas running and retries, see agent.py); it never forgets or
  replaces the remembered id by itself. Joining another cluster on purpose
  means deleting the file (the error message names it).
- An empty id (a scheduler from before cluster ids) is accepted and not
  remembered.
- A file that cannot be written is logged as an error once; the id is then
  remembered in memory only (still checked while this process runs).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import tempfile

log = logging.getLogger(__name__)


class ForeignCluster(Exception):
    """A scheduler serves another cluster than the one this node belongs to."""


class MembershipUnreadable(RuntimeError):
    """The membership file exists but cannot be read: the agent must not start trusting any scheduler."""


class ClusterMembership:
    def __init__(self, path: str | os.PathLike | None):
        self.path = pathlib.Path(path) if path else None
        self.cluster_id = self._load()

    def _load(self) -> str:
        if self.path is None or not self.path.exists():
            return ""
        try:
            return str(json.loads(self.path.read_text())["cluster_id"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            # Unreadable membership must not make the agent trust any scheduler: refuse to start.
            raise MembershipUnreadable(f"cannot read the cluster membership file {self.path}: {err!r}; "
                               f"fix or delete it (deleting it makes this node join the next scheduler's cluster)") from None

    def check(self, scheduler: str, cluster_id: str) -> None:
        """Accept ``cluster_id`` (remembering it if it is the first), or raise ``ForeignCluster``."""
        if not cluster_id or cluster_id == self.cluster_id:
            return
        if self.cluster_id:
            where = f" (delete {self.path} to make this node join it)" if self.path else ""
            raise ForeignCluster(
                f"scheduler {scheduler} serves cluster {cluster_id}, but this node belongs to cluster "
                f"{self.cluster_id}: an empty or wrong store? refusing it and keeping every replica running{where}")
        self.cluster_id = cluster_id
        log.info("joined cluster %s", cluster_id)
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=self.path.name, delete=False) as tmp:
                json.dump({"cluster_id": self.cluster_id}, tmp)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp.name, self.path)
        except OSError as err:
            log.error("cannot remember cluster %s in %s: %r; a scheduler of another cluster is refused only "
                      "until this agent restarts", self.cluster_id, self.path, err)
