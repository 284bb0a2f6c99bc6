"""Checking a model's files before anything runs, and what a host must have installed to serve it.

``check_model`` is what ``scheduler ctl apply`` (on the operator's files) and
the scheduler's ``Apply`` (where it sees the repository) run before a
deployment is accepted; ``missing_modules`` is what ``scheduler dev`` asks
before it applies an example on this host.

Guarantees:

- ``check_model`` reads files and never imports or runs them. It returns
  every problem it finds, each one line ``FILE: field: problem`` (for the
  spec's own fields the caller's ``where`` stands first:
  ``spec.yaml: deployments[0].model.name: ...``), or ``[]``: the repository
  is a folder, the model is a folder in it (a misspelt name gets the closest
  names offered), its ``config.pbtxt`` parses and passes the runtime's own
  validation (``model_config.load_model_config``: the backend or platform is
  one meshserve serves), the version folders the version policy selects
  exist and hold the file the backend loads (``model.py``, ``model.onnx``),
  every ``label_filename`` exists, and ``parameters { key: "requires" }``
  names modules. An ensemble's steps are checked the same way, each model
  once; a step that is not a plain name, not in the repository, or an
  ensemble containing itself is a problem naming the step.
- Nothing raises: an unreadable file or folder is a problem naming it.
- ``missing_modules`` finds modules with ``importlib.util.find_spec``
  (nothing is imported): the backend's own (onnxruntime for ONNX) and those a
  model's ``requires`` parameter lists, through ensemble steps.

What cannot be checked from files: an import that fails inside ``model.py``
on the serving host (a module it lacks). That shows on the host, as the
replica's failure reason, after a bounded number of restarts
(node_agent/replica.py).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import pathlib
import re
from collections.abc import Iterable

from meshserve.common.errors import InvalidArgument
from meshserve.common.model_config import (
    CONFIG_FILE,
    ONNX_FILE,
    PYTHON_FILE,
    ConfigError,
    is_ensemble,
    is_onnx,
    load_model_config,
    selected_versions,
    version_folders,
)
from meshserve.common.model_names import plain_model_name
from meshserve.protos.inference import model_config_pb2 as mc

# config.pbtxt: parameters { key: "requires" value { string_value: "torch, torchvision" } }
REQUIRES_PARAMETER = "requires"
# What a backend imports whatever the model says.
ONNX_MODULES = ("onnxruntime",)
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# Offered for a misspelt model name; more would not read as a hint.
CLOSE_NAMES = 3


def check_model(repository: str | os.PathLike, name: str, where: str = "", steps: Iterable[str] = ()) -> list[str]:
    """Every problem that keeps ``name`` (and the pipeline ``steps``) of ``repository`` from loading; [] if none.

    ``where`` prefixes the spec's own fields (``model.repository``, ``model.name``, ``steps[i].model``).
    """
    prefix = f"{where}." if where else ""
    root = pathlib.Path(repository)
    try:
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "no such folder"
            return [f"{prefix}model.repository: {os.fspath(repository)}: {what}"]
        models = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        return [f"{prefix}model.repository: {os.fspath(repository)}: cannot read: {err.strerror or err}"]
    checker = _Checker(root, models)
    checker.named(name, f"{prefix}model.name")
    for index, step in enumerate(steps):
        checker.named(step, f"{prefix}steps[{index}].model")
    return checker.problems


class _Checker:
    def __init__(self, root: pathlib.Path, models: list[str]):
        self.root = root
        self.models = models
        self.problems: list[str] = []
        self._checked: set[str] = set()

    def named(self, name: str, field: str) -> None:
        """A model the spec names: a missing one is the spec field's problem."""
        if name not in self.models:
            self.problems.append(f"{field}: {_missing(name, self.root, self.models)}")
            return
        self.model(name, ())

    def model(self, name: str, ensembles: tuple[str, ...]) -> None:
        if name in self._checked:
            return
        self._checked.add(name)
        model_dir = self.root / name
        try:
            config = load_model_config(model_dir)
        except ConfigError as err:
            self.problems.append(err.message)
            return
        except OSError as err:
            self.problems.append(f"{model_dir}: cannot read: {err.strerror or err}")
            return
        except Exception as err:  # noqa: BLE001 - a hostile file must give a problem line, never a traceback
            self.problems.append(f"{model_dir / CONFIG_FILE}: cannot read: {type(err).__name__}: {err}"[:500])
            return
        config_path = model_dir / CONFIG_FILE
        self._labels(model_dir, config, config_path)
        self._requires(config, config_path)
        if is_ensemble(config):
            self._steps(config, config_path, ensembles + (name,))
        else:
            self._files(model_dir, config, config_path)

    def _steps(self, config: mc.ModelConfig, config_path: pathlib.Path, ensembles: tuple[str, ...]) -> None:
        for index, step in enumerate(config.ensemble_scheduling.step):
            field = f"{config_path}: ensemble_scheduling.step[{index}].model_name"
            try:
                plain_model_name(step.model_name)
            except InvalidArgument as err:
                self.problems.append(f"{field}: {err.message}")
                continue
            if step.model_name in ensembles:
                cycle = " -> ".join(ensembles + (step.model_name,))
                self.problems.append(f"{field}: ensembles contain each other: {cycle}")
            elif step.model_name not in self.models:
                self.problems.append(f"{field}: {_missing(step.model_name, self.root, self.models)}")
            else:
                self.model(step.model_name, ensembles)

    def _files(self, model_dir: pathlib.Path, config: mc.ModelConfig, config_path: pathlib.Path) -> None:
        """The version folders the policy selects, each with the file its backend loads."""
        needed, field = (ONNX_FILE, "platform") if is_onnx(config) else (PYTHON_FILE, "backend")
        kind = f'{field} "{config.platform or config.backend}"'
        try:
            available = version_folders(model_dir)
        except OSError as err:
            self.problems.append(f"{model_dir}: cannot read: {err.strerror or err}")
            return
        if not available:
            self.problems.append(f"{model_dir / '1' / needed}: {field}: missing ({kind} loads {needed} "
                                 f"from a numbered version folder, and {model_dir} has none)")
            return
        versions = selected_versions(config, available)
        if not versions:
            self.problems.append(f"{config_path}: version_policy: selects none of the version folders "
                                 f"{', '.join(map(str, available))}")
        for version in versions:
            path = model_dir / str(version) / needed
            if not path.is_file():
                self.problems.append(f"{path}: {field}: missing ({kind} loads {needed} from version {version})")

    def _labels(self, model_dir: pathlib.Path, config: mc.ModelConfig, config_path: pathlib.Path) -> None:
        for index, output in enumerate(config.output):
            if output.label_filename and not (model_dir / output.label_filename).is_file():
                self.problems.append(f"{config_path}: output[{index}].label_filename: "
                                     f"{output.label_filename!r} is not a file in {model_dir}")

    def _requires(self, config: mc.ModelConfig, config_path: pathlib.Path) -> None:
        for module in _listed_modules(config):
            if not _MODULE_NAME.match(module):
                self.problems.append(f"{config_path}: parameters.{REQUIRES_PARAMETER}: {module!r} is not a "
                                     f"module name (list importable names, e.g. \"torch, torchvision\")")


def _missing(name: str, root: pathlib.Path, models: list[str]) -> str:
    close = difflib.get_close_matches(name, models, n=CLOSE_NAMES, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else \
        (f"it has {', '.join(models[:10])}{' ...' if len(models) > 10 else ''}" if models else "it has no models")
    return f"no model {name!r} in the repository {root} ({hint})"


def _listed_modules(config: mc.ModelConfig) -> list[str]:
    parameter = config.parameters.get(REQUIRES_PARAMETER)
    if parameter is None:
        return []
    return [part for part in re.split(r"[,\s]+", parameter.string_value) if part]


def required_modules(config: mc.ModelConfig) -> list[str]:
    """The modules serving this one model needs: its backend's and those its ``requires`` parameter lists."""
    backend = list(ONNX_MODULES) if is_onnx(config) else []
    listed = [m for m in _listed_modules(config) if _MODULE_NAME.match(m)]
    return list(dict.fromkeys(backend + listed))


def missing_modules(repository: str | os.PathLike, name: str, steps: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(model, module) for every module ``name`` (its ensemble steps, the pipeline ``steps``) needs and this
    Python cannot find. A model whose files do not load is skipped here: ``check_model`` reports it."""
    root = pathlib.Path(repository)
    missing: list[tuple[str, str]] = []
    pending, seen = [name, *steps], set()
    while pending:
        model = pending.pop(0)
        if model in seen:
            continue
        seen.add(model)
        try:
            config = load_model_config(root / plain_model_name(model))
        except (InvalidArgument, OSError):
            continue
        if is_ensemble(config):
            pending.extend(step.model_name for step in config.ensemble_scheduling.step)
            continue
        missing.extend((model, module) for module in required_modules(config) if not _importable(module))
    return missing


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False

