"""The model repository: which models exist on disk, which are loaded, and why not.

Layout: ``<root>/<model>/config.pbtxt`` and numbered version folders. A
model that fails to load is kept in the index as UNAVAILABLE with the
reason, and every other model keeps serving. Loading a model that is
already loaded loads the new copy first and swaps it in, so requests never
see a gap; the old copy drains before it is closed.

An ensemble (``platform: "ensemble"``) loads after its step models: loading
it first loads the step models of this repository that are not loaded yet
(whatever ``--model`` says, as Triton does), then checks its graph against
them. A model named by ``--remote-model`` is served by another replica: it
is never loaded here, and ensembles reach it over gRPC. An ensemble that
loads with warnings (an unused tensor) is READY with the warnings as reason.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
from dataclasses import dataclass, field

from meshserve.common import model_config as config_rules
from meshserve.common.errors import InvalidArgument, MeshError, NotFound, Unavailable
from meshserve.common.model_names import plain_model_name
from meshserve.common.security.tls import TlsConfig

from .ensemble import EnsembleModel
from .ensemble_remote import RemoteModels
from .model import ServedModel
from .warmup import sample_requests, warm_up

# What a model name serves: a model of its own, or an ensemble (which duck-types ServedModel).
Loaded = ServedModel | EnsembleModel

log = logging.getLogger(__name__)

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


@dataclass
class ModelEntry:
    name: str
    state: str = UNAVAILABLE
    reason: str = "not loaded"
    versions: dict[str, Loaded] = field(default_factory=dict)  # ascending by version


class ModelRepository:
    """Loads and serves the models of one repository folder."""

    def __init__(self, root: str | pathlib.Path, models: list[str] | None = None,
                 remote_models: dict[str, str] | None = None, tls: TlsConfig | None = None):
        self.root = pathlib.Path(root).resolve()
        if not self.root.is_dir():
            raise NotFound(f"model repository {self.root} is not a directory")
        self._allowed = set(models) if models else None
        self.remote = RemoteModels(remote_models, tls)
        self._entries: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def available(self) -> list[str]:
        """Model folders on disk (restricted to ``--model`` names when given)."""
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        return [n for n in names if (self._allowed is None or n in self._allowed) and n not in self.remote]

    async def load_all(self) -> None:
        for name in self.available():
            if name in self._entries:  # loaded already, as a step of an ensemble
                continue
            try:
                await self.load(name)
            except Exception:  # reported in the index; the others still load
                pass
        if self._allowed:
            for name in sorted(self._allowed - set(self.available())):
                self._entries[name] = ModelEntry(name, reason=f"no folder {self.root / name}")

    def _model_dir(self, name: str) -> pathlib.Path:
        model_dir = self.root / plain_model_name(name)
        if not model_dir.is_dir():
            raise NotFound(f"model '{name}' is not in the repository {self.root}")
        return model_dir

    async def load(self, name: str) -> None:
        """Load (or reload) every selected version of ``name``; raises with the reason on failure."""
        await self._load(name, ())

    async def _load(self, name: str, ensembles: tuple[str, ...]) -> None:
        """``ensembles``: the ensembles whose loading asked for this one (a cycle guard)."""
        if name in self.remote:
            raise InvalidArgument(f"model '{name}' is served by the remote replica at "
                                  f"{self.remote.address(name)} (--remote-model); it is not loaded here")
        model_dir = self._model_dir(name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            entry = self._entries.setdefault(name, ModelEntry(name))
            previous = dict(entry.versions)
            entry.state, entry.reason = LOADING, ""
            loaded: dict[str, Loaded] = {}
            try:
                config = config_rules.load_model_config(model_dir)
                available = config_rules.version_folders(model_dir)
                if config_rules.is_ensemble(config):
                    version = str(available[-1]) if available else "1"  # its version folder may be empty or absent
                    loaded[version] = await self._load_ensemble(config, version, ensembles + (name,))
                    available = []
                versions = config_rules.selected_versions(config, available) if available else []
                if not versions and not loaded:
                    raise config_rules.ConfigError(
                        f"{model_dir}: no version folder matches the version policy (found {available})"
                    )
                samples = sample_requests(config, model_dir)   # checked before any version loads
                for number in versions:
                    loaded[str(number)] = await ServedModel.load(model_dir, config, str(number))
                    await warm_up(loaded[str(number)], samples)   # ready only once warm (runtime/warmup.py)
            except Exception as err:
                for model in loaded.values():
                    await model.close()
                entry.state = READY if previous else UNAVAILABLE
                entry.reason = f"{type(err).__name__}: {err}" if not previous else \
                    f"reload failed, still serving the previous copy: {err}"
                # The predictor's own exception gets its traceback; our refusals (a bad config) are their message.
                log.error("model '%s' failed to load: %s", name, err,
                          exc_info=None if isinstance(err, MeshError) else err)
                raise Unavailable(f"model '{name}' failed to load: {err}") from err
            warnings = [w for model in loaded.values() for w in getattr(model, "warnings", ())]
            entry.versions, entry.state = loaded, READY
            entry.reason = "; ".join(f"WARNING: {w}" for w in warnings)
            log.info("model '%s' ready (versions %s)", name, ", ".join(loaded))
        for model in previous.values():
            await model.close()

    async def _load_ensemble(self, config, version: str, ensembles: tuple[str, ...]) -> EnsembleModel:
        for step in config.ensemble_scheduling.step:
            dependency = step.model_name
            if dependency in self.remote or not (self.root / dependency).is_dir():
                continue  # remote, or unknown: the ensemble's check names it
            if dependency in ensembles:
                raise config_rules.ConfigError(
                    f"ensemble '{config.name}': ensembles contain each other: "
                    f"{' -> '.join(ensembles + (dependency,))}")
            entry = self._entries.get(dependency)
            if entry is None or (not entry.versions and entry.state != LOADING):
                try:
                    await self._load(dependency, ensembles)
                except Exception:  # its reason is in the index; the ensemble's check names it
                    pass
        return await EnsembleModel.load(config, version, self.get, self.remote, self._step_config)

    def _step_config(self, name: str, version: str):
        """The config of a loaded local step model, or NotFound/Unavailable saying why not."""
        if name not in self._entries and not (self.root / name).is_dir():
            raise NotFound(f"model '{name}' is not in the repository {self.root} "
                           f"and not served remotely (--remote-model)")
        return self.get(name, version).config

    def dependents(self, name: str) -> list[str]:
        """The loaded local step models of ensemble ``name`` that no other loaded ensemble uses:
        what Triton's ``unload_dependents`` unloads with it."""
        entry = self._entries.get(name)
        if entry is None:
            return []
        steps = self._local_steps(entry)
        still_used = {step for other in self._entries.values() if other.name != name
                      for step in self._local_steps(other)}
        return sorted(step for step in steps - still_used
                      if step in self._entries and self._entries[step].versions)

    def _local_steps(self, entry: ModelEntry) -> set[str]:
        return {step.model_name for model in entry.versions.values() if isinstance(model, EnsembleModel)
                for step in model.config.ensemble_scheduling.step if step.model_name not in self.remote}

    async def unload(self, name: str) -> None:
        entry = self._entries.get(name)
        if entry is None or not entry.versions:
            raise NotFound(f"model '{name}' is not loaded")
        async with self._locks.setdefault(name, asyncio.Lock()):
            versions, entry.versions = entry.versions, {}
            entry.state, entry.reason = UNLOADING, ""
            for model in versions.values():
                await model.close()
            entry.state, entry.reason = UNAVAILABLE, "unloaded"

    def get(self, name: str, version: str = "") -> Loaded:
        """The ready model version (the latest when ``version`` is empty)."""
        entry = self._entries.get(name)
        if entry is None:
            raise NotFound(f"unknown model '{name}'")
        if not entry.versions:
            raise Unavailable(f"model '{name}' is not ready: {entry.reason or entry.state}")
        if not version:
            return entry.versions[max(entry.versions, key=int)]
        model = entry.versions.get(version)
        if model is None:
            raise NotFound(
                f"model '{name}' has no ready version '{version}'; ready: {', '.join(entry.versions)}"
            )
        return model

    def versions(self, name: str) -> list[str]:
        entry = self._entries.get(name)
        return list(entry.versions) if entry else []

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) for every model on disk or tried."""
        rows: list[tuple[str, str, str, str]] = []
        for name in sorted(set(self.available()) | set(self._entries)):
            entry = self._entries.get(name, ModelEntry(name))
            if entry.versions:
                rows.extend((name, version, entry.state, entry.reason) for version in entry.versions)
            else:
                rows.append((name, "", entry.state, entry.reason))
        return rows

    def ready_models(self) -> list[Loaded]:
        return [model for entry in self._entries.values() for model in entry.versions.values()]

    async def close(self) -> None:
        for entry in self._entries.values():
            versions, entry.versions = entry.versions, {}
            for model in versions.values():
                await model.close()
            entry.state, entry.reason = UNAVAILABLE, "server shutting down"
        await self.remote.close()
