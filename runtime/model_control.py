"""Who may load and unload models on a running replica: Triton's ``--model-control-mode``.

``none`` (the default): the models are those the runtime loaded at start;
``RepositoryModelLoad`` and ``RepositoryModelUnload`` are refused with
FAILED_PRECONDITION naming the flag. ``explicit``: both are allowed, and
when the runtime was started with ``--model`` only for those models (a
client cannot load another model of the repository). A mesh-managed
replica never gets ``explicit`` unless its host's policy allows it
(node_agent/policy.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.common.errors import FailedPrecondition
from meshserve.common.runtime_options import (
    MODEL_CONTROL_EXPLICIT,
    MODEL_CONTROL_FLAG,
    MODEL_CONTROL_MODES,
    MODEL_CONTROL_NONE,
)

NONE, EXPLICIT = MODEL_CONTROL_NONE, MODEL_CONTROL_EXPLICIT
MODES = MODEL_CONTROL_MODES
FLAG = MODEL_CONTROL_FLAG


@dataclass(frozen=True)
class ModelControl:
    mode: str = NONE
    models: frozenset[str] | None = None   # the --model names; None: every model of the repository

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"model control {self.mode!r}: expected one of {', '.join(MODES)}")

    def check(self, action: str, name: str) -> None:
        """Raise ``FailedPrecondition`` unless ``action`` ("load" | "unload") of ``name`` is allowed."""
        if self.mode != EXPLICIT:
            raise FailedPrecondition(f"model {action} is disabled on this runtime: it was started without "
                                     f"{FLAG} {EXPLICIT}")
        if self.models is not None and name not in self.models:
            raise FailedPrecondition(f"model '{name}' is not one this runtime was started with "
                                     f"(--model {' --model '.join(sorted(self.models))}); {action} refused")
