"""Bearer tokens, for people (and hosts) without certificates.

Server side: a token file (``--token-file FILE`` or ``MESHSERVE_TOKEN_FILE``),
one line per token, ``sha256:<hex digest> ROLE NAME``; blank lines and ``#``
comments are ignored. Only digests are stored, so the file grants nothing to
whoever reads it. ``scheduler ctl tokens create --role R --name N`` prints a
new token and its line.

Client side: ``--token-file FILE`` (a file holding the token itself) or
``MESHSERVE_TOKEN``; sent as ``authorization: Bearer TOKEN`` metadata on
every call of the channel (``token_interceptors``).

Guarantees:
- A presented token is hashed and compared with every digest in the file in
  constant time (``hmac.compare_digest``, no early exit), so timing tells
  nothing about which digest came close.
- A malformed file (bad digest, unknown role, bad name, a digest twice) is a
  ``TokenError`` naming the line, before anything listens. A file changed on
  disk is read again (checked at most every ``RELOAD_CHECK_S``); a changed
  file that does not parse is logged once and the previous tokens stay.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping

import grpc

from .identity import Identity, identity

log = logging.getLogger(__name__)

ENV_TOKEN_FILE = "MESHSERVE_TOKEN_FILE"   # server: the tokens it accepts
ENV_TOKEN = "MESHSERVE_TOKEN"             # client: the token it presents
# Never inherited by a process a daemon starts (a replica runs model code): see ``without_token_environment``.
ENVIRONMENT_VARIABLES = (ENV_TOKEN, ENV_TOKEN_FILE)
METADATA_KEY = "authorization"
BEARER = "Bearer "
DIGEST_PREFIX = "sha256:"
# 32 random bytes: as strong as the SHA-256 they are stored under.
TOKEN_BYTES = 32
# A token file is re-read at most this often: one stat a second costs nothing, and revoking takes a second.
RELOAD_CHECK_S = 1.0
# Longer than any token we issue by far; a longer header is refused before it is hashed.
MAX_TOKEN_CHARS = 512


class TokenError(ValueError):
    """A token file that cannot be used; the message names the file and line."""


def digest(token: str) -> str:
    return DIGEST_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_line(token: str, role: str, name: str) -> str:
    """The token file line for ``token``: ``sha256:<hex> ROLE NAME``; ValueError for a bad role or name."""
    who = identity(role, name)
    return f"{digest(token)} {who.role} {who.name}"


def parse_token_file(text: str, path: str = "token file") -> list[tuple[bytes, Identity]]:
    entries: list[tuple[bytes, Identity]] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        where = f"{path} line {number}"
        if len(parts) != 3 or not parts[0].startswith(DIGEST_PREFIX):
            raise TokenError(f"{where}: expected 'sha256:<hex digest> ROLE NAME'")
        hexdigest = parts[0][len(DIGEST_PREFIX):].lower()
        if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
            raise TokenError(f"{where}: the digest must be 64 hex digits (a SHA-256)")
        if hexdigest in seen:
            raise TokenError(f"{where}: this digest is already listed")
        seen.add(hexdigest)
        try:
            who = identity(parts[1], parts[2])
        except ValueError as err:
            raise TokenError(f"{where}: {err}") from None
        entries.append((bytes.fromhex(hexdigest), who))
    return entries


class TokenTable:
    """The tokens a server accepts, from its token file, re-read when the file changes."""

    def __init__(self, path: str, clock=time.monotonic):
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._entries = self._load()          # raises TokenError: a server does not start with a bad file
        self._checked = clock()
        self._failed_stamp: tuple | None = None

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self) -> list[tuple[bytes, Identity]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise TokenError(f"--token-file {self.path}: {getattr(err, 'strerror', None) or err}") from None
        return parse_token_file(text, self.path)

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked < RELOAD_CHECK_S:
            return
        with self._lock:
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp or stamp == self._failed_stamp:
                return
            try:
                self._entries = self._load()
            except TokenError as err:
                self._failed_stamp = stamp
                log.warning("token file changed but cannot be used (%s); the previous tokens stay", err)
                return
            self._stamp, self._failed_stamp = stamp, None
        log.info("token file %s reloaded (%d tokens)", self.path, len(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def identify(self, token: str) -> Identity | None:
        """The identity ``token`` stands for, or None."""
        self._maybe_reload()
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for stored, who in self._entries:       # every entry, every time: no early exit
            if hmac.compare_digest(stored, presented):
                found = who
        return found


def bearer_token(metadata) -> str | None:
    """The token of an ``authorization: Bearer ...`` entry of ``metadata``; "" for another scheme; None if absent."""
    for key, value in metadata or ():
        if key == METADATA_KEY:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            return text[len(BEARER):].strip() if text.startswith(BEARER) else ""
    return None


# -- client side ----------------------------------------------------------------------------------


def client_token(token_file: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The token this process presents: the contents of ``token_file``, else ``$MESHSERVE_TOKEN``, else None.

    Raises TokenError for an unreadable or empty file.
    """
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise TokenError(f"--token-file {token_file}: {getattr(err, 'strerror', None) or err}") from None
        if not token:
            raise TokenError(f"--token-file {token_file} is empty")
        return token
    token = (os.environ if environ is None else environ).get(ENV_TOKEN, "").strip()
    return token or None


def _replace_metadata(details, metadata):
    """grpc's ClientCallDetails with other ``metadata`` (aio's is a namedtuple; the blocking one is not)."""
    if isinstance(details, grpc.aio.ClientCallDetails):
        return details._replace(metadata=grpc.aio.Metadata(*metadata))
    return _SyncDetails(details.method, details.timeout, metadata, details.credentials,
                        getattr(details, "wait_for_ready", None), getattr(details, "compression", None))


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


class _AioToken:
    def __init__(self, token: str):
        self._token = token

    def _details(self, details):
        return _replace_metadata(details, _metadata(details, self._token))


# grpc.aio sorts a channel's interceptors by their first matching kind, so each kind is its own class.
class _AioUnaryUnaryToken(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioUnaryStreamToken(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioStreamUnaryToken(_AioToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _AioStreamStreamToken(_AioToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._token = token

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_replace_metadata(details, _metadata(details, self._token)), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_replace_metadata(details, _metadata(details, self._token)), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(_replace_metadata(details, _metadata(details, self._token)), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(_replace_metadata(details, _metadata(details, self._token)), request_iterator)


def _metadata(details, token: str) -> list[tuple[str, str]]:
    kept = [(k, v) for k, v in (details.metadata or ()) if k != METADATA_KEY]
    return [*kept, (METADATA_KEY, BEARER + token)]


def without_token_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` less the token variables: a child (a replica running model code) never gets this process's token."""
    return {k: v for k, v in env.items() if k not in ENVIRONMENT_VARIABLES}


def aio_token_interceptors(token: str | None) -> list:
    """Client interceptors for a ``grpc.aio`` channel that send ``token`` on every call; [] without one."""
    if not token:
        return []
    return [kind(token) for kind in (_AioUnaryUnaryToken, _AioUnaryStreamToken, _AioStreamUnaryToken,
                                     _AioStreamStreamToken)]


def with_token(channel: grpc.Channel, token: str | None) -> grpc.Channel:
    """A blocking ``channel`` that sends ``token`` on every call (``channel`` itself without one)."""
    return grpc.intercept_channel(channel, _SyncToken(token)) if token else channel


__all__ = ["ENV_TOKEN", "ENV_TOKEN_FILE", "TokenError", "TokenTable", "aio_token_interceptors", "bearer_token",
           "client_token", "digest", "new_token", "parse_token_file", "token_line", "with_token", "without_token_environment"]
