"""The host's execution policy: what a replica assignment may make this node run.

An assignment comes from the scheduler, which takes specs from whoever can
reach its admin API; the node agent runs it as a process on this host. So the
host decides, from a local file the scheduler cannot change
(``node-agent --policy FILE``), and refuses anything else:

- the model repository must resolve (symlinks and ``..`` followed) inside one
  of ``repository_roots``; the model name must be a plain name. An
  assignment with a content digest (an uploaded, http or s3 model) is not
  read from a repository root: the agent fetches it into its own artifact
  cache (``--artifact-cache``) and runs it only once the digest matched;
- environment variables: an ALLOWLIST (a denylist cannot work: PYTHONWARNINGS
  plus BROWSER was enough to run a shell). Built in: the variables the mesh
  itself sets and thread-count knobs (``BUILTIN_ENV``); the file may add
  names and ``PREFIX_*`` patterns;
- runtime flags: only those of ``SAFE_RUNTIME_FLAGS`` (node_agent/runtime_flags.py; or the file's subset),
  matched exactly, never an abbreviation, each value checked. Flags that
  choose where the runtime listens or which repository it reads are never
  allowed, nor ``--insecure`` or ``--tls-*`` (TLS comes from the agent);
  ``--model-control`` only with ``allow_model_control: true``;
- shared memory: replicas get ``--shared-memory`` from ``shared_memory``
  (``none``, the default, or ``system``: clients on this host may register
  regions with a replica, each seeing only its own), never from a spec;
- the Unix user: ``run_as`` names it; replicas never run as root unless
  ``allow_root: true`` says so (the dev default on a host where everything
  runs as root);
- caps on what one replica may ask for: GPUs, memory per GPU, CPU cores.

Guarantees: ``admit`` is a pure function of the spec and the policy (plus
the file system for path resolution); it returns the repository path to use
(resolved, so a symlink swapped later cannot redirect the runtime) or raises
``Refused`` listing every problem. A policy file with an unknown key, a bad
value or a root of ``/`` is refused at start (``PolicyError``): a typo never
loosens or silently ignores a rule.

Defaults, without ``--policy``: no repository root (every assignment is
refused, saying to pass ``--policy``), the built-in environment variables,
every safe runtime flag, no model control, no shared memory, replicas run as the agent's user
but never as root, no caps.
"""

from __future__ import annotations

import fnmatch
import os
import pathlib
import pwd
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from meshserve.common.assignment_env import CPU_ENV, GPU_MEMORY_ENV, MEMORY_ENV
from meshserve.common.errors import MeshError
from meshserve.common.model_names import plain_model_name
from meshserve.common.runtime_options import SHARED_MEMORY_MODES, SHARED_MEMORY_NONE
from meshserve.common.sizes import format_size, parse_size

from .runtime_flags import NEVER_FLAGS, SAFE_RUNTIME_FLAGS, runtime_arg_problems
from .runtime_flags import shown as _shown

if TYPE_CHECKING:
    from .replica import ReplicaSpec

# Set by the mesh (the scheduler declares what it booked) or thread-count knobs of numeric libraries:
# none of them names a file, a command or a module to load.
BUILTIN_ENV = frozenset({
    GPU_MEMORY_ENV, CPU_ENV, MEMORY_ENV,
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
})
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\*?")


class PolicyError(ValueError):
    """The policy file itself is wrong; the agent does not start."""


class Refused(Exception):
    """An assignment this host does not run; ``reason`` lists every problem."""

    def __init__(self, problems: list[str]):
        self.reason = "; ".join(problems)
        super().__init__(f"refused by host policy: {self.reason}")


@dataclass(frozen=True)
class RunAs:
    """The Unix user replicas run as."""

    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class Limits:
    gpus: int | None = None                    # per replica
    gpu_memory_bytes: int | None = None        # per GPU of a replica
    cpu_cores: float | None = None             # per replica


@dataclass(frozen=True)
class HostPolicy:
    repository_roots: tuple[pathlib.Path, ...] = ()      # resolved
    env_names: frozenset[str] = BUILTIN_ENV
    env_patterns: tuple[str, ...] = ()                    # "PREFIX_*"
    runtime_flags: frozenset[str] = frozenset(SAFE_RUNTIME_FLAGS)
    allow_model_control: bool = False
    shared_memory: str = SHARED_MEMORY_NONE               # the replicas' --shared-memory
    run_as: RunAs | None = None                           # None: the agent's own user
    allow_root: bool = False
    limits: Limits = field(default_factory=Limits)
    source: str = "built-in defaults"                     # where it was read from, for messages

    # -- reading ------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> HostPolicy:
        """Read a YAML policy file; ``PolicyError`` naming the key for anything wrong."""
        try:
            text = pathlib.Path(path).read_text(encoding="utf-8")
            data = yaml.safe_load(text) or {}
        except (OSError, yaml.YAMLError) as err:
            raise PolicyError(f"policy {path}: {err}") from None
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: Any, source: str = "policy") -> HostPolicy:
        if not isinstance(data, Mapping):
            raise PolicyError(f"{source}: expected a mapping of policy keys")
        unknown = set(data) - _KEYS
        if unknown:
            raise PolicyError(f"{source}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                              f"(known: {', '.join(sorted(_KEYS))})")
        roots = tuple(_root(item, source) for item in _strings(data.get("repository_roots", []),
                                                                 f"{source}: repository_roots"))
        names, patterns = set(BUILTIN_ENV), []
        for item in _strings(data.get("env", []), f"{source}: env"):
            if not _ENV_PATTERN.fullmatch(item) or item == "*":
                raise PolicyError(f"{source}: env {item!r} is neither a variable name nor a PREFIX_* pattern")
            (patterns.append(item) if item.endswith("*") else names.add(item))
        flags = frozenset(SAFE_RUNTIME_FLAGS)
        if "runtime_flags" in data:
            flags = frozenset(_strings(data["runtime_flags"], f"{source}: runtime_flags"))
            for flag in sorted(flags):
                if flag in NEVER_FLAGS:
                    raise PolicyError(f"{source}: runtime_flags: {flag} is never allowed ({NEVER_FLAGS[flag]})")
                if flag not in SAFE_RUNTIME_FLAGS:
                    raise PolicyError(f"{source}: runtime_flags: {flag} is not one of "
                                      f"{', '.join(sorted(SAFE_RUNTIME_FLAGS))}")
        run_as = data.get("run_as")
        return cls(
            repository_roots=roots, env_names=frozenset(names), env_patterns=tuple(patterns),
            runtime_flags=flags,
            allow_model_control=_bool(data.get("allow_model_control", False), f"{source}: allow_model_control"),
            shared_memory=_shared_memory(data.get("shared_memory", SHARED_MEMORY_NONE), source),
            run_as=None if run_as is None else _user(run_as, source),
            allow_root=_bool(data.get("allow_root", False), f"{source}: allow_root"),
            limits=_limits(data.get("limits") or {}, source), source=source,
        )

    # -- deciding -----------------------------------------------------------

    def replicas_run_as_root(self, agent_euid: int | None = None) -> bool:
        euid = os.geteuid() if agent_euid is None else agent_euid
        return (self.run_as.uid if self.run_as else euid) == 0

    def admit(self, spec: ReplicaSpec, agent_euid: int | None = None) -> str:
        """The resolved repository path to start ``spec`` with; ``Refused`` with every problem otherwise."""
        problems: list[str] = []
        try:
            plain_model_name(spec.model_name)
        except MeshError as err:
            problems.append(err.message)
        # A fetched model lives in the agent's own artifact cache, checked by its content digest.
        repository = "" if spec.artifact_digest else self._repository(spec.model_repository, problems)
        self._check_env(dict(spec.env), problems)
        problems += runtime_arg_problems(spec.runtime_args, self.runtime_flags, self.allow_model_control,
                                         self.source)
        self._check_limits(spec, problems)
        if self.replicas_run_as_root(agent_euid) and not self.allow_root:
            problems.append("replicas would run as root: set run_as in the host policy "
                            "(or allow_root: true on a development host)")
        if problems:
            raise Refused(problems)
        return repository

    def _repository(self, path: str, problems: list[str]) -> str:
        if not self.repository_roots:
            problems.append(f"no model repository root is allowed on this host ({self.source}); "
                            f"start the node agent with --policy FILE listing repository_roots")
            return path
        if not path or not os.path.isabs(path):
            problems.append(f"model repository {_shown(path)} is not an absolute path")
            return path
        resolved = pathlib.Path(os.path.realpath(path))
        if not any(resolved == root or root in resolved.parents for root in self.repository_roots):
            problems.append(f"model repository {_shown(path)} (resolved {_shown(str(resolved))}) is outside "
                            f"every allowed root ({', '.join(map(str, self.repository_roots))})")
        return str(resolved)

    def env_allowed(self, name: str) -> bool:
        return name in self.env_names or any(fnmatch.fnmatchcase(name, pattern) for pattern in self.env_patterns)

    def _check_env(self, env: Mapping[str, str], problems: list[str]) -> None:
        refused = sorted(name for name in env if not (_ENV_NAME.fullmatch(name) and self.env_allowed(name)))
        if refused:
            names = ", ".join(_shown(name) for name in refused)
            problems.append(f"env {names} {'is' if len(refused) == 1 else 'are'} not allowed "
                            f"(allowed: the built-in set{' and ' + ', '.join(self.env_patterns) if self.env_patterns else ''}"
                            f" and names listed under env: in {self.source})")
        for name, value in env.items():
            if "\0" in value:
                problems.append(f"env {_shown(name)} contains a NUL character")

    def _check_limits(self, spec: ReplicaSpec, problems: list[str]) -> None:
        limits = self.limits
        if limits.gpus is not None and len(spec.gpu_indices) > limits.gpus:
            problems.append(f"{len(spec.gpu_indices)} GPUs asked for, at most {limits.gpus} per replica")
        if limits.gpu_memory_bytes is not None:
            declared = spec.declared_gpu_memory()
            if declared is None:
                problems.append(f"no readable {GPU_MEMORY_ENV} to check against the cap of "
                                f"{format_size(limits.gpu_memory_bytes)} per GPU")
            elif declared > limits.gpu_memory_bytes:
                problems.append(f"{format_size(declared)} of GPU memory asked for, at most "
                                f"{format_size(limits.gpu_memory_bytes)} per GPU")
        if limits.cpu_cores is not None:
            value = dict(spec.env).get(CPU_ENV)
            try:
                cores = float(value) if value is not None else None
            except ValueError:
                cores = None
            if cores is None:
                problems.append(f"no readable {CPU_ENV} to check against the cap of {limits.cpu_cores:g} cores")
            elif cores > limits.cpu_cores:
                problems.append(f"{cores:g} CPU cores asked for, at most {limits.cpu_cores:g} per replica")


_KEYS = {"repository_roots", "env", "runtime_flags", "allow_model_control", "shared_memory", "run_as",
         "allow_root", "limits"}
_LIMIT_KEYS = {"gpus", "gpu_memory", "cpu"}


def _shared_memory(value: Any, source: str) -> str:
    if value not in SHARED_MEMORY_MODES:
        raise PolicyError(f"{source}: shared_memory: expected one of {', '.join(SHARED_MEMORY_MODES)}, not {value!r}")
    return value


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise PolicyError(f"{where}: expected a list of non-empty strings")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"{where}: expected true or false")
    return value


def _root(text: str, source: str) -> pathlib.Path:
    if not os.path.isabs(text):
        raise PolicyError(f"{source}: repository_roots: {text!r} is not an absolute path")
    root = pathlib.Path(os.path.realpath(text))
    if root == pathlib.Path(root.anchor):
        raise PolicyError(f"{source}: repository_roots: {text!r} would allow every file of the host")
    return root


def _user(value: Any, source: str) -> RunAs:
    if not isinstance(value, str) or not value:
        raise PolicyError(f"{source}: run_as: expected a user name")
    try:
        entry = pwd.getpwnam(value)
    except KeyError:
        raise PolicyError(f"{source}: run_as: no user {value!r} on this host") from None
    if entry.pw_uid != os.geteuid() and os.geteuid() != 0:
        raise PolicyError(f"{source}: run_as: {value} needs the node agent to run as root to switch user")
    return RunAs(value, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def _limits(value: Any, source: str) -> Limits:
    if not isinstance(value, Mapping) or set(value) - _LIMIT_KEYS:
        raise PolicyError(f"{source}: limits: expected a mapping of {', '.join(sorted(_LIMIT_KEYS))}")
    gpus, memory, cpu = value.get("gpus"), value.get("gpu_memory"), value.get("cpu")
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0):
        raise PolicyError(f"{source}: limits.gpus: expected a whole number")
    try:
        memory_bytes = None if memory is None else parse_size(str(memory))
    except ValueError as err:
        raise PolicyError(f"{source}: limits.gpu_memory: {err}") from None
    if cpu is not None and (isinstance(cpu, bool) or not isinstance(cpu, (int, float)) or cpu <= 0):
        raise PolicyError(f"{source}: limits.cpu: expected a positive number of cores")
    return Limits(gpus=gpus, gpu_memory_bytes=memory_bytes, cpu_cores=None if cpu is None else float(cpu))


def policy_yaml(comment: str = "", **keys: Any) -> str:
    """A policy file's text from its keys (checked: ``PolicyError`` for a bad one), for generated policies."""
    HostPolicy.from_mapping(keys, source="generated policy")
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    return header + yaml.safe_dump(keys, sort_keys=False)


def development_policy_yaml(*repository_roots: str | os.PathLike) -> str:
    """What ``scheduler dev`` and the tests run with: the given roots, and replicas as root only where the
    agent itself is root (a container or CI machine where everything runs as root)."""
    return policy_yaml(
        "Generated for a development mesh (scheduler dev, tests): model repositories under these roots,\n"
        "the built-in environment variables and runtime flags. Replicas run as the agent's user; root is\n"
        "allowed only because the agent runs as root here. Not for a shared or production host.",
        repository_roots=[str(root) for root in repository_roots], allow_root=os.geteuid() == 0)
