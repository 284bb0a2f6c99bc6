"""The deployment spec: what ``scheduler ctl apply -f`` reads and the scheduler stores.

A spec file is YAML with one object per document (separate documents with
``---``). Every field but ``kind``, ``name`` and ``model`` has a default::

    kind: Deployment              # required; the only kind so far (pipelines come later)
    name: add-sub                 # required; a DNS label: a-z, 0-9 and '-', at most 63 characters
    model:
      repository: ../models       # required; a Triton-style model repository folder (path)
      name: add_sub               # required; the model's folder in that repository
      source: path                # path (default): repository is a folder on every host;
                                  # upload: `scheduler ctl apply` uploads repository/name from
                                  # the operator's machine; http(s)://.../model.tar(.gz): an
                                  # archive of the model folder; s3://bucket/prefix: its files
      digest: sha256:...          # the model's content digest (common/artifacts.py); filled by
                                  # `scheduler ctl apply`, pinned in the revision
    replicas: 2                   # default 1; 0 keeps the deployment with nothing running
    resources:                    # what ONE replica needs
      gpus: 1                     # default 0: CPU only
      gpu_memory: 4GiB            # on EACH of its GPUs; required when gpus > 0, refused when 0
      cpu: 1                      # cores, default 1; fractions (0.5) and millicores ("500m") too
      memory: 2GiB                # host memory, default 0 (nothing reserved)
    placement:
      strategy: spread            # spread (default): a deployment's replicas on different hosts
                                  # where possible; pack: fill one host's GPUs before the next
      node_selector:              # only nodes carrying all these labels; values are strings
        gpu: h100
    revision_history: 5           # old revisions kept for rollback; default 5
    runtime_args: [--drain-delay, "2"]   # extra `python -m meshserve.runtime` arguments; default none
    env: {OMP_NUM_THREADS: "4"}   # extra environment of the replica process; default none
    rollout:                      # how a new revision replaces the running one
      strategy: rolling           # rolling (default): one new replica at a time, an old one
                                  # leaves when a new one is ready; canary: the new revision
                                  # runs beside the stable one and takes canary_weight percent
                                  # of requests until `scheduler ctl promote` (or `rollback`)
      canary_weight: 10           # percent of requests to the new revision, 1..99
      canary_replicas: 1          # replicas of the new revision while it is a canary
    autoscaling:                  # replicas follow the load (scheduler/autoscaler.py); default: fixed
      min_replicas: 1             # 0: scale to zero when idle, wake on the first call at a proxy
      max_replicas: 4
      target_in_flight: 2         # calls in flight (queued included) per replica to aim for
      downscale_delay_s: 60       # a lower want must hold this long; more in the README

Adding a section (autoscaling, artifacts, ...): a frozen dataclass with its
defaults, a field of ``DeploymentSpec`` defaulting to it, its name in
``_TOP_FIELDS``, a ``_section(value, path, check)`` reader called from
``_deployment``, and its block in ``to_dict``. Everything downstream (the
store, history, rollback) carries the typed spec as it is.

Sizes are a whole number of bytes (``1073741824``) or a number and a unit:
binary ``B KiB MiB GiB TiB`` (also Kubernetes' ``Ki Mi Gi Ti``) or decimal
``KB MB GB TB``; ``1.5GiB`` is fine. A bare ``40G`` is refused as ambiguous.

A relative ``model.repository`` resolves against the spec file's folder when
the caller passes ``base_dir`` (``scheduler ctl apply -f`` does; ``-f -``
resolves against the working directory); without ``base_dir`` it is kept as
written.

Guarantees:

- ``parse_deployments`` returns every document as a ``DeploymentSpec``, or
  raises one ``SpecError`` listing every problem it found (it does not stop at
  the first), each as ``deployments[i].field.path: what is wrong (what to
  write)``, where ``i`` counts the non-empty documents from 0. Unknown fields,
  wrong types, duplicate keys and duplicate names are refused, never ignored;
  YAML syntax errors carry their line and column. No input raises anything
  but ``SpecError``.
- ``to_dict()``/``to_yaml()`` give the complete spec (defaults filled, sizes
  in their exact canonical unit) and parse back to an equal spec.
- ``DeploymentSpec.from_dict(spec.to_dict()) == spec``: the store keeps that
  dict, and reading it back is checked as strictly as a spec file.
- ``fingerprint()`` is a SHA-256 of that canonical form: equal for specs that
  mean the same thing however they were written (``40GiB`` or
  ``42949672960``, keys in any order), across processes and versions of
  Python. ``revision_fingerprint()`` leaves out ``replicas`` and
  ``revision_history``, the two fields whose change needs no new revision.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from meshserve.common import sizes
from meshserve.common.artifacts import ArtifactError, check_digest
from meshserve.common.errors import InvalidArgument

from .autoscaler import AutoscalingConfig

KIND_DEPLOYMENT = "Deployment"
KIND_PIPELINE = "Pipeline"
KINDS = (KIND_DEPLOYMENT, KIND_PIPELINE)
COLOCATE_MODES = ("required", "preferred", "none")
STRATEGIES = ("spread", "pack")
DEFAULT_REPLICAS = 1
DEFAULT_REVISION_HISTORY = 5
DEFAULT_CPU = 1.0
# Far beyond any one mesh; keeps counts inside the admin API's uint32 fields.
MAX_REPLICAS = 10_000

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NAME_MAX = 63                     # a DNS label's limit; replica ids and hostnames derive from it
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SIZE_HINT = sizes.HINT
# Set by the node agent for every replica; a spec that sets them would fight it.
_AGENT_ARGS = {"--model-repository": "from model.repository", "--model": "from model.name",
               "--listen": "to a free port on its node"}
_AGENT_ENV = {"CUDA_VISIBLE_DEVICES": "to the GPUs placement picks"}

_TOP_FIELDS = ("kind", "name", "model", "replicas", "resources", "placement", "revision_history",
               "runtime_args", "env", "rollout", "colocate", "steps", "autoscaling")
_MODEL_FIELDS = ("repository", "name", "source", "digest")
SOURCE_PATH, SOURCE_UPLOAD = "path", "upload"
URL_SCHEMES = ("http://", "https://", "s3://")
_RESOURCE_FIELDS = ("gpus", "gpu_memory", "cpu", "memory")
_PLACEMENT_FIELDS = ("strategy", "node_selector")


class SpecError(InvalidArgument):
    """An invalid spec; ``problems`` lists every problem found, one line each, path first."""

    def __init__(self, problems: list[str] | str):
        self.problems: tuple[str, ...] = (problems,) if isinstance(problems, str) else tuple(problems)
        super().__init__("\n".join(self.problems))


class FrozenMap(Mapping):
    """A read-only, hashable str -> str mapping, kept in key order."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | None = None):
        self._items = dict(sorted((items or {}).items()))

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"


@dataclass(frozen=True)
class ModelRef:
    repository: str
    name: str
    source: str = SOURCE_PATH     # path | upload | an http(s):// or s3:// URL
    digest: str = ""              # sha256:<hex> of the model folder's content; "" when not taken

    def to_dict(self) -> dict[str, str]:
        # source and digest only when set: specs applied before they existed keep their fingerprint.
        return {"repository": self.repository, "name": self.name,
                **({"source": self.source} if self.source != SOURCE_PATH else {}),
                **({"digest": self.digest} if self.digest else {})}

    def artifact(self) -> tuple[str, str]:
        """(digest, source) an agent fetches the model from; ("", "") for a model at a path on every host.
        source is "scheduler" for an uploaded bundle, else the http(s):// or s3:// URL."""
        if self.source == SOURCE_PATH or not self.digest:
            return "", ""
        return self.digest, "scheduler" if self.source == SOURCE_UPLOAD else self.source


@dataclass(frozen=True)
class Resources:
    gpus: int = 0
    gpu_memory: int = 0          # bytes, on each GPU
    cpu: float = DEFAULT_CPU     # cores
    memory: int = 0              # bytes of host memory; 0: nothing reserved


@dataclass(frozen=True)
class Placement:
    strategy: str = "spread"
    node_selector: FrozenMap = field(default_factory=FrozenMap)


@dataclass(frozen=True)
class PipelineStep:
    """One step model of a pipeline and what one replica of it needs."""

    model: str
    resources: Resources = field(default_factory=Resources)


@dataclass(frozen=True)
class Rollout:
    strategy: str = "rolling"
    canary_weight: int = 10       # percent of requests to the new revision while it is a canary
    canary_replicas: int = 1
    # Rolling (Kubernetes semantics, a count or "N%" of the desired replicas): at most max_surge replicas
    # beyond the desired count, at most max_unavailable of them not ready, during the change.
    max_surge: int | str = 1
    max_unavailable: int | str = 0
    resource_aware: bool = False  # a surge replica no node has room for: replace an old one in place
    progress_deadline_s: int = 600   # a rollout not done by then has failed
    auto_rollback: bool = True    # a failed rollout (crash loop, deadline) goes back to the previous revision


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    model: ModelRef
    replicas: int = DEFAULT_REPLICAS
    resources: Resources = field(default_factory=Resources)
    placement: Placement = field(default_factory=Placement)
    revision_history: int = DEFAULT_REVISION_HISTORY
    runtime_args: tuple[str, ...] = ()
    env: FrozenMap = field(default_factory=FrozenMap)
    rollout: Rollout = field(default_factory=Rollout)
    kind: str = KIND_DEPLOYMENT
    # Pipelines only: the step models with their resources, and where they may run.
    steps: tuple[PipelineStep, ...] = ()
    colocate: str = "required"
    # The replica count follows the load between min and max (scheduler/autoscaler.py); None: fixed.
    autoscaling: AutoscalingConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """The complete spec in the documented shape; plain dicts, lists, str and numbers."""
        return {
            "kind": self.kind,
            "name": self.name,
            "model": self.model.to_dict(),
            "replicas": self.replicas,
            "resources": _resources_dict(self.resources),
            "placement": {"strategy": self.placement.strategy,
                          "node_selector": dict(self.placement.node_selector)},
            "revision_history": self.revision_history,
            "runtime_args": list(self.runtime_args),
            "env": dict(self.env),
            "rollout": {"strategy": self.rollout.strategy, "canary_weight": self.rollout.canary_weight,
                        "canary_replicas": self.rollout.canary_replicas, "max_surge": self.rollout.max_surge,
                        "max_unavailable": self.rollout.max_unavailable,
                        "resource_aware": self.rollout.resource_aware,
                        "progress_deadline_s": self.rollout.progress_deadline_s,
                        "auto_rollback": self.rollout.auto_rollback},
            **({"colocate": self.colocate, "steps": [
                {"model": step.model, "resources": _resources_dict(step.resources)} for step in self.steps]}
               if self.kind == KIND_PIPELINE else {}),
            **({"autoscaling": self.autoscaling.to_spec()} if self.autoscaling is not None else {}),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the canonical spec: equal means applying it again changes nothing."""
        return _digest(self.to_dict())

    def revision_fingerprint(self) -> str:
        """Like ``fingerprint`` without replicas, revision_history, rollout and autoscaling: equal means same
        revision (none of them changes what a replica runs)."""
        canonical = self.to_dict()
        del canonical["replicas"], canonical["revision_history"], canonical["rollout"]
        canonical.pop("autoscaling", None)
        return _digest(canonical)

    def replace(self, **changes: Any) -> DeploymentSpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, value: Any, where: str = "spec") -> DeploymentSpec:
        """The spec ``to_dict`` gave (as the store keeps it), checked like a spec file.

        Raises ``SpecError`` naming every problem (paths start at ``where``); never anything else."""
        check = _Checker()
        spec = _deployment(value, where, None, check)
        if check.problems or spec is None:
            raise SpecError(check.problems or [f"{where}: not a deployment spec"])
        return spec


def _resources_dict(resources: Resources) -> dict[str, Any]:
    return {"gpus": resources.gpus, "gpu_memory": format_size(resources.gpu_memory),
            "cpu": _plain_number(resources.cpu), "memory": format_size(resources.memory)}


def _digest(canonical: dict[str, Any]) -> str:
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _plain_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


# ---------------------------------------------------------------- sizes


def parse_size(value: Any) -> int:
    """Bytes for ``40GiB``, ``512MiB``, ``1.5GB``, ``1024`` or an int; ``SpecError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SpecError(f"{_show(value)} is not a size ({_SIZE_HINT})")
    try:
        return sizes.parse_size(value)
    except ValueError as err:
        raise SpecError(str(err)) from None


format_size = sizes.format_size


# ---------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = key_node.value
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f'duplicate key "{key}" (first at line {seen[key].line + 1})',
                        key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _Loader.construct_mapping)


def _load_documents(text: str) -> list[Any]:
    try:
        return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc is not None]
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = err.problem or err.context or "not valid YAML"
        if not what.startswith("duplicate key"):
            what += " (not valid YAML)"
        raise SpecError(f"{where}{what}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"not valid YAML: {err}") from None
    except RecursionError:
        raise SpecError("nested too deeply to read (not a deployment spec)") from None


# ---------------------------------------------------------------- validation


def _show(value: Any) -> str:
    """A value as the user wrote it, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


class _Checker:
    """Collects problems as ``path: message`` while building values."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...], example: str) -> dict | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.add(path, f"expected a mapping ({example}), got {_show(value)}")
            return None
        for key in value:
            if not isinstance(key, str):
                self.add(path, f"key {_show(key)} is not a field name")
            elif key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f'did you mean "{close[0]}"?' if close else "fields: " + ", ".join(allowed)
                self.add(f"{path}.{key}", f"unknown field ({hint})")
        return value

    def integer(self, value: Any, path: str, default: int, maximum: int | None = None) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                self.add(path, f"{_show(value)} is a string (write the number without quotes)")
            else:
                self.add(path, f"expected a whole number, got {_show(value)}")
            return default
        if value < 0:
            self.add(path, f"{value} is negative (use 0 or more)")
            return default
        if maximum is not None and value > maximum:
            self.add(path, f"{value} is more than {maximum}")
            return default
        return value

    def string(self, value: Any, path: str, required_hint: str | None = None) -> str | None:
        if value is None or value == "":
            if required_hint:
                self.add(path, f"required ({required_hint})")
            return None
        if not isinstance(value, str):
            self.add(path, f"expected a string, got {_show(value)}")
            return None
        return value

    def size(self, value: Any, path: str) -> int:
        if value is None:
            return 0
        try:
            return parse_size(value)
        except SpecError as err:
            self.add(path, err.message)
            return 0

    def string_map(self, value: Any, path: str, key_pattern: re.Pattern | None, key_rule: str,
                   example: str) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.add(path, f"expected a mapping of strings ({example}), got {_show(value)}")
            return {}
        result = {}
        for key, item in value.items():
            if not isinstance(key, str) or (key_pattern and not key_pattern.match(key)) or not key:
                self.add(path, f"{_show(key)} is not a valid key ({key_rule})")
                continue
            if not isinstance(item, str):
                self.add(f"{path}.{key}", f'{_show(item)} is not a string (quote it: "{_unquoted(item)}")')
                continue
            result[key] = item
        return result


def _unquoted(value: Any) -> str:
    shown = _show(value)
    return "..." if shown in ("a list", "a mapping") else shown


def _deployment(doc: Any, path: str, base_dir: str | None, check: _Checker) -> DeploymentSpec | None:
    before = len(check.problems)
    top = check.mapping(doc, path, _TOP_FIELDS, "kind: Deployment, name: ..., model: ...")
    if top is None:
        return None
    kind = top.get("kind")
    if kind is None:
        check.add(f"{path}.kind", f"required (kind: {KIND_DEPLOYMENT})")
    elif kind not in KINDS:
        check.add(f"{path}.kind", f"{_show(kind)} is not a kind this version knows (use {' or '.join(KINDS)})")
    for pipeline_only in ("colocate", "steps"):
        if kind != KIND_PIPELINE and pipeline_only in top:
            check.add(f"{path}.{pipeline_only}", f"only a {KIND_PIPELINE} has {pipeline_only}")

    name = check.string(top.get("name"), f"{path}.name", "a DNS label, e.g. add-sub")
    if name is not None and (len(name) > _NAME_MAX or not _NAME.match(name)):
        check.add(f"{path}.name", f"{_show(name)} is not a valid name (lowercase letters, digits and '-', "
                                  f"starting and ending with a letter or digit, at most {_NAME_MAX} characters)")

    model = _model(top, f"{path}.model", base_dir, check)
    replicas = check.integer(top.get("replicas"), f"{path}.replicas", DEFAULT_REPLICAS, MAX_REPLICAS)
    resources = _resources(top.get("resources"), f"{path}.resources", check)
    placement = _placement(top.get("placement"), f"{path}.placement", check)
    history = check.integer(top.get("revision_history"), f"{path}.revision_history", DEFAULT_REVISION_HISTORY)
    runtime_args = _runtime_args(top.get("runtime_args"), f"{path}.runtime_args", check)
    env = check.string_map(top.get("env"), f"{path}.env", _ENV_NAME,
                           "letters, digits and '_', not starting with a digit", 'OMP_NUM_THREADS: "4"')
    for key, why in _AGENT_ENV.items():
        if key in env:
            check.add(f"{path}.env.{key}", f"is set by the node agent ({why}); remove it")

    rollout = _rollout(top.get("rollout"), f"{path}.rollout", check)
    autoscaling = None
    if top.get("autoscaling") is not None:
        try:
            autoscaling = AutoscalingConfig.from_spec(top["autoscaling"])
        except InvalidArgument as err:
            check.add(f"{path}.autoscaling", str(err).removeprefix("autoscaling: "))
        else:
            if "replicas" not in top:   # start within the bounds; the autoscaler takes it from there
                replicas = min(max(replicas, autoscaling.min_replicas), autoscaling.max_replicas)
            elif not autoscaling.min_replicas <= replicas <= autoscaling.max_replicas:
                check.add(f"{path}.replicas", f"{replicas} is outside autoscaling's [min_replicas, max_replicas] "
                                          f"= [{autoscaling.min_replicas}, {autoscaling.max_replicas}]")
    steps: tuple[PipelineStep, ...] = ()
    colocate = "required"
    if kind == KIND_PIPELINE:
        steps = _steps(top.get("steps"), f"{path}.steps", check)
        colocate = top.get("colocate", "required")
        if colocate not in COLOCATE_MODES:
            check.add(f"{path}.colocate", f"{_show(colocate)} is not a mode (use {' | '.join(COLOCATE_MODES)})")

    if len(check.problems) > before or name is None or model is None:
        return None
    return DeploymentSpec(name=name, model=model, replicas=replicas, resources=resources,
                          placement=placement, revision_history=history, runtime_args=runtime_args,
                          env=FrozenMap(env), rollout=rollout, kind=str(kind), steps=steps, colocate=colocate,
                          autoscaling=autoscaling)


_STEP_FIELDS = ("model", "resources")


def _steps(value: Any, path: str, check: _Checker) -> tuple[PipelineStep, ...]:
    if not isinstance(value, list) or not value:
        check.add(path, "required: a list of {model: NAME, resources: {...}}, one per step model")
        return ()
    steps, seen = [], set()
    for index, item in enumerate(value):
        where = f"{path}[{index}]"
        block = check.mapping(item, where, _STEP_FIELDS, "model: preprocess, resources: {cpu: 250m}")
        if block is None:
            continue
        model = check.string(block.get("model"), f"{where}.model", "the step model's folder name")
        if model in seen:
            check.add(f"{where}.model", f"{_show(model)} is listed twice")
        if model is not None:
            seen.add(model)
            steps.append(PipelineStep(model, _resources(block.get("resources"), f"{where}.resources", check)))
    return tuple(steps)


ROLLOUT_STRATEGIES = ("rolling", "canary")
_ROLLOUT_FIELDS = ("strategy", "canary_weight", "canary_replicas", "max_surge", "max_unavailable", "resource_aware",
                   "progress_deadline_s", "auto_rollback")
_PERCENT = re.compile(r"^(100|[1-9]?[0-9])%$")


def _rollout(value: Any, path: str, check: _Checker) -> Rollout:
    block = check.mapping(value, path, _ROLLOUT_FIELDS, "strategy: canary, canary_weight: 10")
    if not block:
        return Rollout()
    strategy = block.get("strategy", "rolling")
    if strategy not in ROLLOUT_STRATEGIES:
        check.add(f"{path}.strategy", f"{_show(strategy)} is not a rollout strategy "
                                      f"(use {' or '.join(ROLLOUT_STRATEGIES)})")
        strategy = "rolling"
    weight = check.integer(block.get("canary_weight"), f"{path}.canary_weight", Rollout.canary_weight, 99)
    if weight < 1:
        check.add(f"{path}.canary_weight", f"{weight} is not a percentage of requests between 1 and 99")
    replicas = check.integer(block.get("canary_replicas"), f"{path}.canary_replicas", Rollout.canary_replicas,
                             MAX_REPLICAS)
    if replicas < 1:
        check.add(f"{path}.canary_replicas", "a canary needs at least 1 replica")
    surge = _count_or_percent(block.get("max_surge", Rollout.max_surge), f"{path}.max_surge", check)
    unavailable = _count_or_percent(block.get("max_unavailable", Rollout.max_unavailable),
                                    f"{path}.max_unavailable", check)
    if surge in (0, "0%") and unavailable in (0, "0%"):
        check.add(f"{path}.max_unavailable", "max_surge and max_unavailable cannot both be 0 (nothing could move)")
    flags = {}
    for flag in ("resource_aware", "auto_rollback"):
        value = block.get(flag, getattr(Rollout, flag))
        if not isinstance(value, bool):
            check.add(f"{path}.{flag}", f"{_show(value)} is not true or false")
            value = getattr(Rollout, flag)
        flags[flag] = value
    deadline = check.integer(block.get("progress_deadline_s"), f"{path}.progress_deadline_s",
                             Rollout.progress_deadline_s, 86_400)
    if deadline < 1:
        check.add(f"{path}.progress_deadline_s", "must be at least 1 second")
    return Rollout(strategy=strategy, canary_weight=weight, canary_replicas=replicas, max_surge=surge,
                   max_unavailable=unavailable, progress_deadline_s=deadline, **flags)


def _count_or_percent(value: Any, path: str, check: _Checker) -> int | str:
    """A replica count (``2``) or a percentage of the desired replicas (``"25%"``), as Kubernetes takes them."""
    if isinstance(value, str) and _PERCENT.match(value):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPLICAS:
        check.add(path, f"{_show(value)} is not a replica count (0..{MAX_REPLICAS}) or a percentage like \"25%\"")
        return 0
    return value


def _model(top: dict, path: str, base_dir: str | None, check: _Checker) -> ModelRef | None:
    if top.get("model") is None:
        check.add(path, "required (model: {repository: PATH, name: MODEL})")
        return None
    model = check.mapping(top["model"], path, _MODEL_FIELDS, "repository: PATH, name: MODEL")
    if model is None:
        return None
    source = _source(model.get("source"), f"{path}.source", check)
    from_url = source is not None and source.startswith(URL_SCHEMES)
    repository = check.string(model.get("repository"), f"{path}.repository",
                              None if from_url else "the model repository folder, e.g. examples/models")
    if from_url and repository is None:
        repository = ""   # the archive or prefix is the model folder itself
    name = check.string(model.get("name"), f"{path}.name", "the model's folder in the repository")
    if name is not None and ("/" in name or name != name.strip() or name in (".", "..")):
        check.add(f"{path}.name", f"{_show(name)} is not a model name (a folder name in the repository)")
        name = None
    digest = check.string(model.get("digest"), f"{path}.digest") or ""
    if digest:
        try:
            check_digest(digest)
        except ArtifactError as err:
            check.add(f"{path}.digest", err.message)
            digest = ""
    if repository is None or name is None or source is None:
        return None
    if base_dir is not None and repository and not os.path.isabs(repository):
        repository = os.path.normpath(os.path.join(os.path.abspath(base_dir), repository))
    return ModelRef(repository=repository, name=name, source=source, digest=digest)


def _source(value: Any, path: str, check: _Checker) -> str | None:
    if value is None:
        return SOURCE_PATH
    hint = f"use {SOURCE_PATH}, {SOURCE_UPLOAD}, an http(s):// archive URL or s3://bucket/prefix"
    if not isinstance(value, str) or not (value in (SOURCE_PATH, SOURCE_UPLOAD) or value.startswith(URL_SCHEMES)):
        check.add(path, f"{_show(value)} is not a model source ({hint})")
        return None
    if value.startswith(URL_SCHEMES) and (len(value) > 2048 or any(c.isspace() or ord(c) < 32 for c in value)
                                           or value.split("://", 1)[1] in ("", "/")):
        check.add(path, f"{_show(value[:100])} is not a usable URL ({hint})")
        return None
    return value


def _resources(value: Any, path: str, check: _Checker) -> Resources:
    block = check.mapping(value, path, _RESOURCE_FIELDS, "gpus: 1, gpu_memory: 4GiB, cpu: 1, memory: 2GiB")
    if not block:
        return Resources()
    before = len(check.problems)
    gpus = check.integer(block.get("gpus"), f"{path}.gpus", 0)
    gpus_ok = len(check.problems) == before
    raw = block.get("gpu_memory")
    before = len(check.problems)
    gpu_memory = check.size(raw, f"{path}.gpu_memory")
    memory_ok = raw is not None and len(check.problems) == before
    need = "the memory one replica needs on each GPU, e.g. 4GiB"
    if gpus > 0 and raw is None:
        check.add(f"{path}.gpu_memory", f"required when gpus > 0 ({need})")
    elif gpus > 0 and memory_ok and gpu_memory == 0:
        check.add(f"{path}.gpu_memory", f"must be more than 0 when gpus > 0 ({need})")
    elif gpus == 0 and gpus_ok and memory_ok and gpu_memory > 0:
        check.add(f"{path}.gpu_memory", "set but gpus is 0 (set gpus: 1 or more, or remove gpu_memory)")
    cpu = _cpu(block.get("cpu"), f"{path}.cpu", check)
    memory = check.size(block.get("memory"), f"{path}.memory")
    return Resources(gpus=gpus, gpu_memory=gpu_memory, cpu=cpu, memory=memory)


def _cpu(value: Any, path: str, check: _Checker) -> float:
    if value is None:
        return DEFAULT_CPU
    if isinstance(value, str) and re.fullmatch(r"\d+m", value.strip()):
        return int(value.strip()[:-1]) / 1000
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        check.add(path, f"{_show(value)} is not a number of cores (e.g. 1, 0.5 or \"500m\")")
        return DEFAULT_CPU
    if not math.isfinite(value) or value < 0:
        check.add(path, f"{value} is not a number of cores (0 or more)")
        return DEFAULT_CPU
    return float(value)


def _placement(value: Any, path: str, check: _Checker) -> Placement:
    block = check.mapping(value, path, _PLACEMENT_FIELDS, "strategy: spread, node_selector: {gpu: h100}")
    if not block:
        return Placement()
    strategy = block.get("strategy")
    if strategy is None:
        strategy = "spread"
    elif strategy not in STRATEGIES:
        check.add(f"{path}.strategy", f"{_show(strategy)} is not a strategy (use {' or '.join(STRATEGIES)})")
        strategy = "spread"
    selector = check.string_map(block.get("node_selector"), f"{path}.node_selector", None,
                                "a non-empty label name", "gpu: h100")
    return Placement(strategy=strategy, node_selector=FrozenMap(selector))


def _runtime_args(value: Any, path: str, check: _Checker) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        check.add(path, f'expected a list of strings (e.g. [--drain-delay, "2"]), got {_show(value)}')
        return ()
    args = []
    for index, item in enumerate(value):
        item_path = f"{path}[{index}]"
        if not isinstance(item, str):
            check.add(item_path, f'{_show(item)} is not a string (quote it: "{_unquoted(item)}")')
            continue
        flag = item.split("=", 1)[0]
        if flag in _AGENT_ARGS:
            check.add(item_path, f"{_show(flag)} is set by the node agent ({_AGENT_ARGS[flag]}); remove it")
            continue
        args.append(item)
    return tuple(args)


def parse_deployments(text: str, base_dir: str | os.PathLike | None = None) -> list[DeploymentSpec]:
    """Every document of ``text`` as a DeploymentSpec, or a SpecError listing every problem."""
    if not isinstance(text, str):
        raise SpecError(f"expected YAML text, got {type(text).__name__}")
    documents = _load_documents(text)
    if not documents:
        raise SpecError(f"no deployments in the spec (expected a document with kind: {KIND_DEPLOYMENT})")
    base = None if base_dir is None else os.fspath(base_dir)
    check = _Checker()
    specs: list[DeploymentSpec] = []
    first_path: dict[str, str] = {}
    for index, doc in enumerate(documents):
        path = f"deployments[{index}]"
        spec = _deployment(doc, path, base, check)
        if spec is None:
            continue
        if spec.name in first_path:
            check.add(f"{path}.name", f'"{spec.name}" is already the name of {first_path[spec.name]}')
            continue
        first_path[spec.name] = path
        specs.append(spec)
    if check.problems:
        raise SpecError(check.problems)
    return specs


def specs_to_yaml(specs: list[DeploymentSpec]) -> str:
    """Several specs as one multi-document YAML text that ``parse_deployments`` reads back."""
    return "---\n".join(spec.to_yaml() for spec in specs)


def parse_spec(text: str) -> DeploymentSpec:
    """The one deployment of a stored spec's YAML (a revision in a record's history)."""
    [spec] = parse_deployments(text)
    return spec
