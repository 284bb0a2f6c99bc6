"""The scheduler's check of the model files it can see, before ``Apply`` accepts (or dry-runs) a spec.

Where the check is done: ``scheduler ctl apply`` checks the operator's files
before it sends anything (scheduler/ctl.py). The scheduler checks again,
because anyone with the admin role may call ``Apply`` directly, but it can
only check what is on its own host: model repositories usually live on the
GPU hosts, not on the control plane. So:

- a ``model.repository`` that is a folder on the scheduler's host is checked
  in full (``common/model_check.py``): a problem refuses the whole request
  with INVALID_ARGUMENT, every problem one ``deployments[i]...`` or
  ``FILE: field: problem`` line, and nothing is stored;
- a repository that is not a folder here is accepted unchecked: the host
  that runs the replica finds what is wrong when it loads, and reports it as
  the replica's reason after a bounded number of restarts
  (node_agent/replica.py).

Model sources that are not a host path (uploaded, fetched over HTTP or S3 with a
content digest: another change) are on the scheduler or ctl by construction;
the same ``check_model`` is meant to run on their materialised folder (not
wired here yet).

The check reads files in a worker thread, never on the event loop; it reads
only ``config.pbtxt`` files (at most 1 MiB each, regular files only) and
folder listings, so an admin naming a path learns no more than that.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from meshserve.common.model_check import check_model

from .spec import DeploymentSpec, SpecError


def visible_model_problems(specs: Sequence[DeploymentSpec]) -> list[str]:
    """Every problem of the models whose repository is a folder on this host (blocking: reads files)."""
    problems: list[str] = []
    for index, spec in enumerate(specs):
        if os.path.isabs(spec.model.repository) and os.path.isdir(spec.model.repository):
            problems += check_model(spec.model.repository, spec.model.name, f"deployments[{index}]",
                                    [step.model for step in spec.steps])
    return problems


async def check_visible_models(specs: Sequence[DeploymentSpec]) -> None:
    """``SpecError`` (INVALID_ARGUMENT) listing every problem of the models this host can see."""
    problems = await asyncio.to_thread(visible_model_problems, specs)
    if problems:
        raise SpecError(problems)
