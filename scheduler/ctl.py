"""``scheduler ctl``: the admin command line, a thin client of ``AdminService``.

    scheduler ctl [--server A[,B...]] [-o table|json|yaml] [--timeout S] VERB ...

      apply -f FILE|DIR|- [-f ...] [--dry-run] [--files-on-nodes]
      get nodes|deployments|replicas [NAME]
      describe node|deployment|replica NAME
      delete deployment NAME | delete node NAME [--force]
      scale NAME --replicas N
      promote NAME | rollback NAME
      rollout status NAME [--wait S] | rollout history NAME
      cordon NODE | uncordon NODE | drain NODE [--force]
      explain replica|deployment NAME

The global options may also follow the verb (``get nodes -o yaml``); a kind
may be singular, plural or short (``deploy``, ``no``), and ``KIND/NAME`` works
where ``KIND NAME`` does.

Finding the scheduler: ``--server`` (default: ``$MESHSERVE_SCHEDULER``, else
127.0.0.1:7070) lists one or more schedulers. All are asked ``Leader`` at
once (a dead host listed first costs nothing once the leader answers); the
one that says it is the leader is used, else the leader a standby names. A
server that does not implement ``Leader`` is tried last, as a scheduler
without elections; if it does not serve the admin API either, ctl says the
address is not a scheduler's.

``apply`` checks every file with ``scheduler.spec`` before connecting, so a
bad spec fails at once with every problem and its field path, and nothing is
sent. It also checks every model's files where this machine has them
(``common/model_check.py``: the repository folder, the model's folder in it,
every ``config.pbtxt`` of the model and its ensemble steps, the files their
backends load), each problem as ``FILE: field: problem``. A repository that
is not on this machine is refused unless ``--files-on-nodes`` says it lives
only on the serving hosts (the scheduler checks it where it sees it; each
host when the replica loads). It then sends the specs in their canonical
form (defaults filled, a relative ``model.repository`` resolved against the
file's folder), so the scheduler never sees a path relative to a folder it
cannot know. Each model is pinned by its content digest (common/artifacts.py)
before sending:
``source: upload`` folders are digested, packed and uploaded here (skipped
when the scheduler holds that digest already), http(s) and s3 sources are
fetched once here to digest them, and a path source is digested when this
machine has the folder. A changed model is then a new revision.

Requests: ``Get.kind`` is plural (nodes|deployments|replicas), as the proto
says; ``Describe``, ``Delete`` and ``Explain`` take the singular kind.

Exit codes: 0 done; 1 the request failed (invalid spec, not found, refused by
the scheduler); 2 usage error; 3 no scheduler reachable, no leader, its store
unavailable, or no answer in time; 4 ``rollout status`` still in progress when
its wait ended (1: the rollout failed or was rolled back). Every failure is one
``error: ...`` on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import pathlib
import queue
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from meshserve.common import errors
from meshserve.common.artifact_sources import SourceError, fetch_source
from meshserve.common.artifacts import DEFAULT_MAX_BYTES, ArtifactError, digest_folder, pack
from meshserve.common.model_check import check_model
from meshserve.common.security.tls import TlsConfig, TlsError, add_tls_arguments, sync_channel
from meshserve.common.security.tokens import ENV_TOKEN, TokenError, client_token, with_token
from meshserve.protos.mesh import control_pb2 as pb
from meshserve.protos.mesh import control_pb2_grpc as pb_grpc

from . import output
from .spec import (
    MAX_REPLICAS,
    SOURCE_PATH,
    SOURCE_UPLOAD,
    URL_SCHEMES,
    DeploymentSpec,
    SpecError,
    parse_deployments,
    specs_to_yaml,
)
from .store.base import names_an_unavailable_store

SERVER_ENV = "MESHSERVE_SCHEDULER"
DEFAULT_SERVER = "127.0.0.1:7070"
# Every admin call is a store read or one transaction; 10 s is ample on a busy
# scheduler and still short enough for a person waiting at a terminal.
DEFAULT_TIMEOUT_S = 10.0
# A scheduler answers Leader from memory in milliseconds; this bounds how long
# an address that drops packets can stall every command.
LEADER_PROBE_TIMEOUT_S = 3.0
# grpc ends every call by its deadline; this only guards against a callback that never comes.
PROBE_SLACK_S = 2.0

FILES_ON_NODES_FLAG = "--files-on-nodes"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4
ROLLOUT_POLL_S = 0.5
UPLOAD_CHUNK_BYTES = 1 << 20
UPLOAD_MIN_BYTES_PER_S = 20 << 20

_KINDS = {
    "node": "node", "nodes": "node", "no": "node",
    "deployment": "deployment", "deployments": "deployment", "deploy": "deployment",
    "replica": "replica", "replicas": "replica", "rep": "replica",
}
_PLURAL = {"node": "nodes", "deployment": "deployments", "replica": "replicas"}
# Transport failures as grpc words them, and how to say them in one line.
_TRANSPORT_REASONS = (
    ("handshake failed", "TLS handshake failed: check --tls-ca and the certificates"),
    ("connection refused", "connection refused"),
    ("dns resolution failed", "name not found"),
    ("domain name not found", "name not found"),
    ("name or service not known", "name not found"),
    ("errors resolving", "name not found"),
    ("no route to host", "no route to host"),
    ("network is unreachable", "network unreachable"),
    ("connection reset", "connection reset"),
    ("socket closed", "connection closed"),
    ("failed to connect", "cannot connect"),
)


class CtlError(Exception):
    """A failure to report as one ``error:`` line (more only for a list of spec problems)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


# ---------------------------------------------------------------- connection


def _transport_reason(details: str) -> str | None:
    lowered = details.lower()
    for needle, reason in _TRANSPORT_REASONS:
        if needle in lowered:
            return reason
    return None


def _rpc_failure(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return code, details or ""


def _unreachable_reason(code: grpc.StatusCode, details: str, timeout_s: float) -> str:
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer in {timeout_s:g}s"
    return _transport_reason(details) or (details.splitlines()[0] if details else code.name.lower())


class Session:
    """The channel to the leader, found on the first call and closed on exit."""

    def __init__(self, servers: list[str], timeout_s: float, tls: TlsConfig | None = None,
                 token: str | None = None):
        self.servers = servers
        self.timeout_s = timeout_s
        self.tls = tls              # --tls-* / MESHSERVE_TLS_*; None: plaintext
        self.token = token          # --token-file / MESHSERVE_TOKEN: sent as a bearer token on every call
        self.address: str | None = None
        self._leader_unimplemented = False     # the chosen address did not know the Leader RPC
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.AdminServiceStub | None = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._channel is not None:
            self._channel.close()

    def _open(self, address: str) -> grpc.Channel:
        return with_token(sync_channel(address, self.tls), self.token)

    def _probe(self, channels: dict[str, grpc.Channel], timeout_s: float) -> dict[str, Any]:
        """Ask every address ``Leader`` at once; its reply or its RpcError, by address.

        Stops waiting as soon as one says it is the leader, so a dead host
        listed first costs nothing when another is up.
        """
        finished: queue.Queue[str] = queue.Queue()
        calls = {}
        for address, channel in channels.items():
            call = pb_grpc.AdminServiceStub(channel).Leader.future(pb.LeaderRequest(), timeout=timeout_s)
            call.add_done_callback(lambda _, address=address: finished.put(address))
            calls[address] = call
        answers: dict[str, Any] = {}
        try:
            while len(answers) < len(calls):
                address = finished.get(timeout=timeout_s + PROBE_SLACK_S)
                try:
                    answers[address] = calls[address].result()
                except grpc.RpcError as err:
                    answers[address] = err
                    continue
                if answers[address].is_leader:
                    break
        except queue.Empty:
            pass
        for call in calls.values():
            call.cancel()
        return answers

    def _find_leader(self) -> None:
        probe_timeout = min(self.timeout_s, LEADER_PROBE_TIMEOUT_S)
        channels = {address: self._open(address) for address in self.servers}
        answers = self._probe(channels, probe_timeout)
        unreachable: list[str] = []
        named: list[tuple[str, str]] = []      # (standby, the leader it names)
        # Without the Leader RPC: a scheduler that predates elections, or no scheduler at
        # all (another gRPC or HTTP/2 server). Used last; its next call tells which.
        unimplemented: list[str] = []
        broken: list[str] = []                 # reachable, but Leader failed with a server error
        # Reachable, but the scheduler itself says it cannot serve now (its store is down).
        unavailable: list[str] = []
        chosen = None
        for address in self.servers:
            answer = answers.get(address)
            if isinstance(answer, pb.LeaderResponse):
                if answer.is_leader:
                    chosen = address
                    break
                named.append((address, answer.leader_address))
                continue
            code, details = (_rpc_failure(answer) if answer is not None
                             else (grpc.StatusCode.DEADLINE_EXCEEDED, ""))
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                for channel in channels.values():
                    channel.close()
                raise CtlError(f"the scheduler at {address} refused us ({code.name}): {details}"
                               + (f"; give --token-file or ${ENV_TOKEN}, or a client certificate"
                                  if code is grpc.StatusCode.UNAUTHENTICATED else ""))
            if code is grpc.StatusCode.UNIMPLEMENTED:
                unimplemented.append(address)
            elif code is grpc.StatusCode.UNAVAILABLE and names_an_unavailable_store(details):
                unavailable.append(f"{address} ({details.splitlines()[0]})")
            elif code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                broken.append(f"{address} ({code.name}: {details.splitlines()[0] if details else 'no details'})")
            else:
                unreachable.append(f"{address} ({_unreachable_reason(code, details, probe_timeout)})")
        if chosen is None:
            chosen = next((leader for _, leader in named if leader), None)
        if chosen is None and unimplemented:
            chosen = unimplemented[0]
            self._leader_unimplemented = True
        if chosen is None:
            for channel in channels.values():
                channel.close()
            if named:
                standbys = ", ".join(address for address, _ in named)
                are = "is a standby" if len(named) == 1 else "are standbys"
                raise CtlError(f"no scheduler leader: {standbys} {are} and no leader is elected yet; "
                               "retry in a few seconds", EXIT_UNREACHABLE)
            if broken:
                raise CtlError(f"the scheduler at {', '.join(broken)} failed to say which scheduler leads; "
                               "see its log")
            if unavailable:
                raise CtlError(f"the scheduler at {', '.join(unavailable)} is unavailable; "
                               "retry once it recovers", EXIT_UNREACHABLE)
            where = "the scheduler" if len(unreachable) == 1 else "any scheduler"
            raise CtlError(f"cannot reach {where} at {', '.join(unreachable)}; is `scheduler serve` running?",
                           EXIT_UNREACHABLE)
        for address, channel in channels.items():
            if address != chosen:
                channel.close()
        self.address = chosen
        self._channel = channels.get(chosen) or self._open(chosen)
        self._stub = pb_grpc.AdminServiceStub(self._channel)

    def call(self, method: str, request: Any) -> Any:
        """One admin RPC on the leader; a failure becomes a CtlError with its message and exit code."""
        if self._stub is None:
            self._find_leader()
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout_s)
        except grpc.RpcError as err:
            raise self._failure(method, *_rpc_failure(err)) from None

    def stream(self, method: str, request: Any, timeout_s: float) -> Iterator[Any]:
        """A server-streaming admin RPC on the leader, as its messages; failures as in ``call``."""
        if self._stub is None:
            self._find_leader()
        try:
            yield from getattr(self._stub, method)(request, timeout=timeout_s)
        except grpc.RpcError as err:
            raise self._failure(method, *_rpc_failure(err)) from None

    def upload(self, digest: str, bundle: pathlib.Path) -> bool:
        """Send a bundle unless the scheduler holds it already; True when it was sent."""
        if self._stub is None:
            self._find_leader()
        artifacts = pb_grpc.ArtifactServiceStub(self._channel)
        try:
            if artifacts.Stat(pb.ArtifactRequest(digest=digest), timeout=self.timeout_s).present:
                return False
            size = bundle.stat().st_size
            # A large bundle takes a while: the timeout grows with it (at least 20 MiB/s expected).
            timeout = self.timeout_s + size / UPLOAD_MIN_BYTES_PER_S
            artifacts.Upload(_chunks(digest, bundle, size), timeout=timeout)
        except grpc.RpcError as err:
            raise self._failure("Upload", *_rpc_failure(err)) from None
        return True

    def _failure(self, method: str, code: grpc.StatusCode, details: str) -> CtlError:
        error = errors.error_for_status(code, details or code.name)
        if isinstance(error, errors.DeadlineExceeded):
            return CtlError(f"the scheduler at {self.address} did not answer {method} in {self.timeout_s:g}s "
                            f"(a longer --timeout may help)", EXIT_UNREACHABLE)
        if isinstance(error, errors.Unavailable) and names_an_unavailable_store(details):
            return CtlError(f"the scheduler at {self.address} is unavailable: {error.message}", EXIT_UNREACHABLE)
        if isinstance(error, errors.Unavailable):
            reason = _transport_reason(details)
            if reason:
                return CtlError(f"cannot reach the scheduler at {self.address} ({reason}); "
                                f"is `scheduler serve` running?", EXIT_UNREACHABLE)
            return CtlError(f"the scheduler at {self.address} is unavailable: {error.message}", EXIT_UNREACHABLE)
        if isinstance(error, errors.Unimplemented) and self._leader_unimplemented:
            return CtlError(f"the server at {self.address} does not serve the scheduler's admin API "
                            f"({error.message}); is it a scheduler's address?", EXIT_UNREACHABLE)
        if isinstance(error, errors.Unimplemented):
            return CtlError(f"the scheduler at {self.address} does not implement {method} "
                            f"(is it an older version?)")
        if isinstance(error, (errors.Unauthenticated, errors.PermissionDenied)):
            return CtlError(f"{method} refused ({code.name}): {error.message}")
        if isinstance(error, (errors.Internal, errors.Cancelled)) or type(error) is errors.MeshError:
            return CtlError(f"the scheduler failed ({code.name}): {error.message}")
        return CtlError(error.message)


def _chunks(digest: str, bundle: pathlib.Path, size: int) -> Iterator[pb.ArtifactChunk]:
    with open(bundle, "rb") as handle:
        yield pb.ArtifactChunk(digest=digest, size_bytes=size, data=handle.read(UPLOAD_CHUNK_BYTES))
        while data := handle.read(UPLOAD_CHUNK_BYTES):
            yield pb.ArtifactChunk(data=data)


# ---------------------------------------------------------------- helpers


def _now_unix_ms() -> int:
    """Wall-clock time for showing ages, never for deadlines."""
    return time.time_ns() // 1_000_000


def _kind(word: str, allowed: tuple[str, ...]) -> str:
    kind = _KINDS.get(word.lower())
    if kind not in allowed:
        raise CtlError(f"unknown kind {word!r} here (use {' or '.join(allowed)})", EXIT_USAGE)
    return kind


def _kind_and_name(words: list[str], allowed: tuple[str, ...], name_required: bool) -> tuple[str, str]:
    """``KIND NAME``, ``KIND/NAME`` or (when the name is optional) ``KIND``."""
    first, rest = words[0], words[1:]
    if "/" in first:
        first, _, name = first.partition("/")
        rest = [name, *rest]
    kind = _kind(first, allowed)
    if len(rest) > 1:
        raise CtlError(f"expected KIND NAME, got {' '.join(words)!r}", EXIT_USAGE)
    name = rest[0] if rest else ""
    if name_required and not name:
        raise CtlError(f"which {kind}? give its name: {kind} NAME", EXIT_USAGE)
    return kind, name


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _done(args: argparse.Namespace, kind: str, name: str, result: str, **extra: Any) -> int:
    if args.output == "table":
        _write(f"{kind}/{name} {result}\n")
    else:
        _write(output.dump({"kind": kind, "name": name, "result": result, **extra}, args.output))
    return EXIT_OK


def _read_specs(sources: list[str], check_files: bool = True) -> list[DeploymentSpec]:
    """Every spec file checked, and with ``check_files`` every model's files on this machine
    (``common/model_check.py``; not an http(s) or s3 source: its files are fetched); the specs of them all,
    or a CtlError listing every problem."""
    files: list[tuple[str, str, str]] = []          # (label, text, base folder)
    problems: list[str] = []
    for source in sources:
        if source == "-":
            files.append(("<stdin>", sys.stdin.read(), os.getcwd()))
            continue
        path = pathlib.Path(source)
        paths = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
        if path.is_dir() and not paths:
            problems.append(f"{source}: no .yaml or .yml files in this folder")
        for item in paths:
            try:
                files.append((str(item), item.read_text(encoding="utf-8"), str(item.resolve().parent)))
            except (OSError, UnicodeDecodeError) as err:
                problems.append(f"cannot read {item}: {getattr(err, 'strerror', None) or err}")
    specs = []
    seen: dict[str, str] = {}
    for label, text, base in files:
        try:
            parsed = parse_deployments(text, base_dir=base)
        except SpecError as err:
            problems += [f"{label}: {problem}" for problem in err.problems]
            continue
        for index, spec in enumerate(parsed):
            if spec.name in seen:
                problems.append(f'{label}: deployments[{index}].name: "{spec.name}" is also in {seen[spec.name]}')
                continue
            seen[spec.name] = label
            specs.append(spec)
            if check_files and not spec.model.source.startswith(URL_SCHEMES):
                problems += check_model(spec.model.repository, spec.model.name, f"{label}: deployments[{index}]",
                                        [step.model for step in spec.steps])
    hint = ""
    if any(".model.repository: " in problem and problem.endswith(": no such folder") for problem in problems):
        hint = (f"\n(a repository that is only on the serving hosts: apply with {FILES_ON_NODES_FLAG}; "
                "each host then checks it when the replica loads)")
    if len(problems) == 1:
        raise CtlError(problems[0] + hint)
    if problems:
        raise CtlError(f"{len(problems)} problems; nothing was applied:\n" + "\n".join(problems) + hint)
    return specs


def _pin_models(specs: list[DeploymentSpec], session: Session | None) -> list[DeploymentSpec]:
    """Each spec with its model's content digest; uploaded bundles sent (``session`` None: not sent).

    An upload source must be a readable folder here; a path source is digested when this machine
    has the folder (so a changed model is a new revision), and sent as it is otherwise."""
    pinned = []
    for spec in specs:
        model = spec.model
        folder = pathlib.Path(model.repository, model.name)
        if model.source in (SOURCE_UPLOAD, SOURCE_PATH) and not model.digest and (
                model.source == SOURCE_UPLOAD or folder.is_dir()):
            try:
                digest = digest_folder(folder)
            except ArtifactError as err:
                raise CtlError(f"deployment/{spec.name}: {err.message}") from None
            except OSError as err:
                raise CtlError(f"deployment/{spec.name}: cannot read {folder}: {err.strerror or err}") from None
            model = dataclasses.replace(model, digest=digest)
            spec = spec.replace(model=model)
        if model.source.startswith(URL_SCHEMES) and not model.digest:
            spec = spec.replace(model=dataclasses.replace(model, digest=_digest_of_url(spec.name, model.source)))
            model = spec.model
        if model.source == SOURCE_UPLOAD and session is not None:
            with tempfile.TemporaryDirectory(prefix="meshserve-bundle-") as scratch:
                bundle = pathlib.Path(scratch, "bundle.tar")
                with open(bundle, "wb") as out:
                    pack(folder, out)
                session.upload(model.digest, bundle)
        pinned.append(spec)
    return pinned


def _digest_of_url(name: str, source: str) -> str:
    """Fetch a URL source once, here, to pin its content digest in the revision."""
    with tempfile.TemporaryDirectory(prefix="meshserve-source-") as scratch:
        folder = pathlib.Path(scratch, "model")
        folder.mkdir()
        try:
            asyncio.run(fetch_source(source, folder, lambda done, total: None, DEFAULT_MAX_BYTES))
            return digest_folder(folder)
        except (SourceError, ArtifactError) as err:
            raise CtlError(f"deployment/{name}: cannot take the digest of {source}: "
                           f"{getattr(err, 'message', None) or err}") from None


# ---------------------------------------------------------------- verbs


def _apply(args: argparse.Namespace, session: Session) -> int:
    specs = _pin_models(_read_specs(args.filenames, check_files=not args.files_on_nodes),
                        None if args.dry_run else session)
    spec_yaml = specs_to_yaml(specs)
    reply = session.call("Apply", pb.ApplyRequest(spec_yaml=spec_yaml, dry_run=args.dry_run))
    if args.output != "table":
        _write(output.render(reply, args.output))
        return EXIT_OK
    suffix = " (dry run)" if args.dry_run else ""
    _write("".join(f"{line}{'' if line.endswith(suffix) else suffix}\n" for line in reply.applied))
    return EXIT_OK


def _get(args: argparse.Namespace, session: Session) -> int:
    kind, name = _kind_and_name([args.kind, *([args.name] if args.name else [])], tuple(_PLURAL), False)
    plural = _PLURAL[kind]
    reply = session.call("Get", pb.GetRequest(kind=plural, name=name))
    items = getattr(reply, plural)
    if name and not items:
        raise CtlError(f'{kind} "{name}" not found')
    if args.output != "table":
        _write(output.dump(output.get_data(reply, plural), args.output))
    elif not items:
        sys.stderr.write(f"No {plural} found.\n")
    else:
        _write(output.get_table(reply, plural, _now_unix_ms()))
    return EXIT_OK


def _describe(args: argparse.Namespace, session: Session) -> int:
    kind, name = _kind_and_name(args.target, tuple(_PLURAL), True)
    reply = session.call("Describe", pb.DescribeRequest(kind=kind, name=name))
    if not getattr(reply.object, _PLURAL[kind]):
        raise CtlError(f'{kind} "{name}" not found')
    if args.output != "table":
        _write(output.render(reply, args.output))
    else:
        _write(output.describe_text(reply, kind, _now_unix_ms()))
    return EXIT_OK


def _delete(args: argparse.Namespace, session: Session) -> int:
    kind, name = _kind_and_name(args.target, ("deployment", "node"), True)
    if kind == "deployment":
        if args.force:
            raise CtlError("--force applies to `delete node` only", EXIT_USAGE)
        session.call("Delete", pb.DeleteRequest(kind=kind, name=name))
        return _done(args, kind, name, "deleted")
    reply = session.call("DeleteNode", pb.DeleteNodeRequest(name=name, force=args.force))
    moved = list(reply.replicas)
    if args.output != "table":
        return _done(args, kind, name, "deleted", replicas=moved)
    return _done(args, kind, name, f"deleted; its replicas are placed again: {', '.join(moved)}" if moved
                 else "deleted")


def _scale(args: argparse.Namespace, session: Session) -> int:
    kind, name = _kind_and_name(args.target if "/" in args.target[0] or len(args.target) > 1
                                else ["deployment", *args.target], ("deployment",), True)
    session.call("Scale", pb.ScaleRequest(name=name, replicas=args.replicas))
    return _done(args, kind, name, "scaled", replicas=args.replicas)


def _rollout_verb(method: str) -> Callable[[argparse.Namespace, Session], int]:
    def verb(args: argparse.Namespace, session: Session) -> int:
        kind, name = _kind_and_name(args.target if "/" in args.target[0] or len(args.target) > 1
                                    else ["deployment", *args.target], ("deployment",), True)
        reply = session.call(method, pb.RolloutRequest(name=name))
        if args.output != "table":
            _write(output.render(reply, args.output))
        else:
            _write(f"deployment/{name}: {reply.message}\n")
        return EXIT_OK
    return verb


def _rollout(args: argparse.Namespace, session: Session) -> int:
    """``rollout status NAME``: wait for the current rollout; ``rollout history NAME``: its kept revisions."""
    name = args.name.partition("/")[2] if args.name.startswith(("deployment/", "deployments/")) else args.name
    if args.action == "history":
        deployment = session.call("Get", pb.GetRequest(kind="deployments", name=name)).deployments[0]
        if args.output != "table":
            _write(output.dump({"revisions": [output.to_data(r) for r in deployment.revisions]}, args.output))
        else:
            _write(output.revisions_table(deployment, int(time.time() * 1000)))
        return EXIT_OK
    deadline = time.monotonic() + args.wait
    last = ""
    while True:
        deployment = session.call("Get", pb.GetRequest(kind="deployments", name=name)).deployments[0]
        replicas = session.call("Get", pb.GetRequest(kind="replicas", name=name)).replicas
        state, line = output.rollout_progress(deployment, replicas)
        if line != last:
            _write(line + "\n")
            last = line
        if state != "progressing":
            return EXIT_OK if state == "complete" else EXIT_FAILED
        if time.monotonic() >= deadline:
            sys.stderr.write(f"error: deployment/{name}: the rollout is still in progress after {args.wait:g}s\n")
            return EXIT_TIMEOUT
        time.sleep(ROLLOUT_POLL_S)


def _node_verb(method: str, result: str) -> Callable[[argparse.Namespace, Session], int]:
    def verb(args: argparse.Namespace, session: Session) -> int:
        name = args.node.partition("/")[2] if args.node.startswith(("node/", "nodes/")) else args.node
        session.call(method, pb.NodeRequest(name=name, force=getattr(args, "force", False)))
        return _done(args, "node", name, result)
    return verb


def _explain(args: argparse.Namespace, session: Session) -> int:
    kind, name = _kind_and_name(args.target, ("replica", "deployment"), True)
    reply = session.call("Explain", pb.ExplainRequest(kind=kind, name=name))
    if args.output != "table":
        _write(output.render(reply, args.output))
    elif not reply.lines:
        sys.stderr.write(f"No decisions recorded for {kind}/{name}.\n")
    else:
        _write("".join(f"{line}\n" for line in reply.lines))
    return EXIT_OK


# `logs --follow` ends on the scheduler's side after --follow-for; the call's own deadline is a little later.
FOLLOW_SLACK_S = 30.0


def _logs(args: argparse.Namespace, session: Session) -> int:
    name = args.replica.partition("/")[2] if args.replica.startswith(("replica/", "replicas/")) else args.replica
    request = pb.ReplicaLogsRequest(replica=name, tail_lines=args.tail, max_bytes=args.limit_bytes,
                                    follow=args.follow, follow_seconds=int(args.follow_for) if args.follow else 0)
    timeout_s = args.follow_for + FOLLOW_SLACK_S if args.follow else args.timeout
    for chunk in session.stream("ReplicaLogs", request, timeout_s):
        _write("".join(f"{line}\n" for line in chunk.lines))
    return EXIT_OK


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value
    return parse


_VERBS: dict[str, Callable[[argparse.Namespace, Session], int]] = {
    "apply": _apply, "get": _get, "describe": _describe, "delete": _delete, "scale": _scale,
    "cordon": _node_verb("Cordon", "cordoned"), "uncordon": _node_verb("Uncordon", "uncordoned"),
    "drain": _node_verb("Drain", "draining"), "explain": _explain,
    "promote": _rollout_verb("Promote"), "rollback": _rollout_verb("Rollback"), "logs": _logs,
    "rollout": _rollout,
}


# ---------------------------------------------------------------- command line


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: the timeout must be more than 0 seconds")
    return value


def _replica_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_REPLICAS:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and {MAX_REPLICAS}")
    return value


def _add_global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The global options; on a verb's parser they default to "not given" so the ctl-level value stands."""
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS
    parser.add_argument("--server", default=default(None), metavar="HOST:PORT[,HOST:PORT...]",
                        help=f"scheduler address(es); the leader among them is used "
                             f"(default: ${SERVER_ENV}, else {DEFAULT_SERVER})")
    parser.add_argument("-o", "--output", choices=output.FORMATS, default=default("table"),
                        help="table (default), json or yaml")
    parser.add_argument("--timeout", type=_positive_seconds, default=default(DEFAULT_TIMEOUT_S), metavar="S",
                        help=f"seconds to wait for each call (default {DEFAULT_TIMEOUT_S:g})")


def build_parser(subparsers: Any = None) -> argparse.ArgumentParser:
    """The ``ctl`` parser: standalone, or mounted as ``ctl`` on another CLI's subparsers.

    Parsed arguments carry ``func=run``: ``args.func(args)`` runs the verb and returns the exit code.
    """
    description = "Administer the mesh: apply deployments, inspect nodes and replicas, and more."
    if subparsers is None:
        parser = argparse.ArgumentParser(prog="scheduler ctl", description=description)
    else:
        parser = subparsers.add_parser("ctl", help="administer the mesh (apply, get, describe, ...)",
                                       description=description)
    _add_global_options(parser, defaults=True)
    add_tls_arguments(parser)   # before the verb: scheduler ctl --tls-ca ca.pem get nodes (or MESHSERVE_TLS_*)
    parser.add_argument("--token-file", metavar="FILE",
                        help=f"a file holding your bearer token (`scheduler ctl tokens create`); "
                             f"default ${ENV_TOKEN}")
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, defaults=False)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    apply = verbs.add_parser("apply", parents=[common], help="create or update deployments from spec files")
    apply.add_argument("-f", "--filename", dest="filenames", action="append", required=True,
                       metavar="FILE", help="a spec file, a folder of them, or - for stdin (repeatable)")
    apply.add_argument("--dry-run", action="store_true", help="validate on the scheduler, change nothing")
    apply.add_argument(FILES_ON_NODES_FLAG, dest="files_on_nodes", action="store_true",
                       help="the model repositories are only on the serving hosts: do not check the model files "
                            "here (the scheduler still checks those it sees; each host checks at load)")

    get = verbs.add_parser("get", parents=[common], help="list nodes, deployments or replicas")
    get.add_argument("kind", metavar="KIND", help="nodes | deployments | replicas (or KIND/NAME)")
    get.add_argument("name", nargs="?", metavar="NAME", help="only this one")

    describe = verbs.add_parser("describe", parents=[common], help="show one object in detail, with events")
    describe.add_argument("target", nargs="+", metavar="KIND NAME", help="node | deployment | replica, and a name")

    delete = verbs.add_parser("delete", parents=[common],
                              help="delete a deployment (its replicas stop) or a node that is gone for good")
    delete.add_argument("target", nargs="+", metavar="deployment|node NAME")
    delete.add_argument("--force", action="store_true",
                        help="node: delete even while it holds replicas (placed again elsewhere) or its "
                             "agent is connected (it registers again as a new node)")

    scale = verbs.add_parser("scale", parents=[common], help="set a deployment's number of replicas")
    scale.add_argument("target", nargs="+", metavar="NAME")
    scale.add_argument("--replicas", type=_replica_count, required=True, metavar="N")

    for verb, text in (("promote", "end a canary: the new revision replaces the stable one"),
                       ("rollback", "back to the stable revision (in a canary) or the previous one")):
        rollout = verbs.add_parser(verb, parents=[common], help=text)
        rollout.add_argument("target", nargs="+", metavar="NAME")

    rollout = verbs.add_parser("rollout", parents=[common], help="a deployment's rollout: status (waits) or history")
    rollout.add_argument("action", choices=("status", "history"))
    rollout.add_argument("name", metavar="NAME")
    rollout.add_argument("--wait", type=_positive_seconds, default=600.0, metavar="S",
                         help="status: how long to wait for the rollout to end (default 600); exit 0 complete, "
                              "1 failed or rolled back, 4 still in progress")

    for verb, text in (("cordon", "stop placing new replicas on a node"),
                       ("uncordon", "allow placing replicas on a node again"),
                       ("drain", "cordon a node and move its replicas elsewhere")):
        node = verbs.add_parser(verb, parents=[common], help=text)
        node.add_argument("node", metavar="NODE")
        if verb == "drain":
            node.add_argument("--force", action="store_true",
                              help="even if a deployment would be left with no ready replica elsewhere")

    explain = verbs.add_parser("explain", parents=[common], help="why a replica or deployment is where it is")
    explain.add_argument("target", nargs="+", metavar="KIND NAME", help="replica | deployment, and a name")

    logs = verbs.add_parser("logs", parents=[common], help="a replica's stdout and stderr, from its node's agent")
    logs.add_argument("replica", metavar="REPLICA")
    logs.add_argument("--tail", type=_bounded_int(1, 10_000), default=100, metavar="N",
                      help="the last N lines (default 100, at most 10000)")
    logs.add_argument("--limit-bytes", type=_bounded_int(1, 16 << 20), default=1 << 20, metavar="BYTES",
                      help="at most this much of the tail (default 1 MiB)")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="then print new output as it comes, until --follow-for or the replica stops")
    logs.add_argument("--follow-for", type=_bounded_int(1, 24 * 3600), default=3600, metavar="S",
                      help="stop following after S seconds (default 3600)")

    parser.set_defaults(func=run)
    return parser


def _servers(args: argparse.Namespace) -> list[str]:
    text = args.server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
    servers = [part.strip() for part in text.split(",") if part.strip()]
    if not servers:
        raise CtlError(f"--server {text!r} names no address (use HOST:PORT[,HOST:PORT...])", EXIT_USAGE)
    return list(dict.fromkeys(servers))


def _tls(args: argparse.Namespace) -> TlsConfig:
    try:
        return TlsConfig.from_args(args)
    except TlsError as err:
        raise CtlError(str(err), EXIT_USAGE) from None


def _token(args: argparse.Namespace) -> str | None:
    try:
        return client_token(getattr(args, "token_file", None))
    except TokenError as err:
        raise CtlError(str(err), EXIT_USAGE) from None


def _print_error(message: str) -> None:
    first, *rest = message.split("\n")
    sys.stderr.write(f"error: {first}\n" + "".join(f"  {line}\n" for line in rest))


def run(args: argparse.Namespace) -> int:
    """Run a parsed command; the exit code. Prints results on stdout and failures on stderr."""
    try:
        with Session(_servers(args), args.timeout, _tls(args), _token(args)) as session:
            return _VERBS[args.verb](args, session)
    except CtlError as err:
        _print_error(err.message)
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as err:  # noqa: BLE001 - the last line of "never a traceback"
        _print_error(f"unexpected {type(err).__name__}: {err} (a bug in scheduler ctl; please report it)")
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """``scheduler ctl ARGS``: parse ``argv`` (without the ``scheduler ctl`` words) and run it."""
    if argv and argv[0] == "certs":  # local files only: no scheduler is asked
        from .certs import main as certs_main

        return certs_main(argv[1:])
    if argv and argv[0] == "tokens":  # prints a new token and its token file line: no scheduler is asked
        from .tokens import main as tokens_main

        return tokens_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    return run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
