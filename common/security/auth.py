"""Who is calling, and may they: the one server interceptor of every meshserve server.

The scheduler, the proxy and the runtime each put ``AuthInterceptor`` after
``StatusInterceptor`` (which turns the errors raised here into statuses).

Guarantees:
- Authentication is on when the server requires client certificates
  (mutual TLS, ``--tls-require-client-cert``) or has a token file
  (``--token-file``). Then every call is checked before its handler runs:
  no credentials (or an unknown token, or a certificate without a meshserve
  identity) -> UNAUTHENTICATED; a role the table (``roles.py``) does not
  allow for the method -> PERMISSION_DENIED naming the roles that may.
- With neither (plaintext or TLS on loopback for development, ``scheduler
  dev``) every caller is allowed; the server logs once that authentication
  is off.
- The identity is the client certificate's ``meshserve://ROLE/NAME`` URI SAN
  (``identity.py``; grpc has verified the chain against ``--tls-ca``), or
  the bearer token's line in the token file. A presented token must be
  valid, and then it is the identity (a person's token over a host's
  certificate).
- ``audit`` (when given) hears every call of ``roles.MUTATING_ADMIN_METHODS``,
  allowed or refused, with its outcome; with authentication off too (the
  caller is then anonymous: None).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc

from meshserve.common.errors import MeshError, PermissionDenied, Unauthenticated

from . import identity as identities
from .identity import Identity
from .roles import MUTATING_ADMIN_METHODS, RoleTable, data_plane_table, parse_restrict
from .tokens import ENV_TOKEN_FILE, TokenError, TokenTable, bearer_token

log = logging.getLogger(__name__)

PEER_CERT_KEY = "x509_pem_cert"
# Parsed certificates kept per server: far more than the distinct peers of any mesh; cleared when full.
CERTIFICATE_CACHE_SIZE = 1024

# (identity or None, method, request or None, outcome: "OK" or a status code name, detail)
Audit = Callable[[Identity | None, str, object, str, str], None]


@dataclass
class Authenticator:
    """Identifies callers: by verified client certificate when ``certificates``, by bearer token when ``tokens``."""

    certificates: bool = False
    tokens: TokenTable | None = None
    _parsed: dict[bytes, Identity | None] = field(default_factory=dict, repr=False)

    @property
    def enabled(self) -> bool:
        return self.certificates or self.tokens is not None

    def describe(self) -> str:
        ways = (["client certificates"] if self.certificates else []) + \
               ([f"tokens ({len(self.tokens)} in {self.tokens.path})"] if self.tokens is not None else [])
        return "authentication by " + " and ".join(ways) if ways else "authentication off: every caller allowed"

    def identify(self, context) -> Identity:
        """The caller's identity; Unauthenticated saying what is missing."""
        token = bearer_token(context.invocation_metadata())
        if token is not None:
            if self.tokens is None:
                raise Unauthenticated("this server accepts no bearer tokens: present a client certificate")
            who = self.tokens.identify(token)
            if who is None:
                raise Unauthenticated("unknown bearer token")
            return who
        pem = self._peer_certificate(context)
        if pem is None:
            accepted = " or ".join((["a client certificate"] if self.certificates else [])
                                   + (["an 'authorization: Bearer TOKEN' header"] if self.tokens is not None else []))
            raise Unauthenticated(f"no credentials: present {accepted}")
        who = self._certificate_identity(pem)
        if who is None:
            raise Unauthenticated(f"the client certificate names no meshserve identity "
                                  f"(one URI SAN {identities.SCHEME}://ROLE/NAME)")
        return who

    def _peer_certificate(self, context) -> bytes | None:
        if not self.certificates:
            return None
        certs = (context.auth_context() or {}).get(PEER_CERT_KEY)
        return certs[0] if certs else None

    def _certificate_identity(self, pem: bytes) -> Identity | None:
        if pem not in self._parsed:
            if len(self._parsed) >= CERTIFICATE_CACHE_SIZE:
                self._parsed.clear()
            try:
                self._parsed[pem] = identities.from_certificate(pem)
            except ValueError:
                self._parsed[pem] = None
        return self._parsed[pem]


def refusal(who: Identity, method: str, table: RoleTable) -> PermissionDenied:
    needed = sorted(table.roles_for(method))
    return PermissionDenied(f"{method} needs role {' or '.join(needed)}; {who} may not call it")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator, table: RoleTable, audit: Audit | None = None):
        self.authenticator = authenticator
        self.table = table
        self.audit = audit
        if not authenticator.enabled:
            log.warning("authentication is off (no --tls-require-client-cert, no --token-file): "
                        "every caller may call everything")
        else:
            log.info("%s", authenticator.describe())

    def admit(self, method: str, context) -> Identity:
        """The caller, if its role may call ``method``; Unauthenticated or PermissionDenied otherwise."""
        who = self.authenticator.identify(context)
        if not self.table.allows(who.role, method):
            raise refusal(who, method, self.table)
        return who

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        audited = self.audit is not None and method in MUTATING_ADMIN_METHODS
        if handler is None or not (self.authenticator.enabled or audited):
            return handler
        codec = dict(request_deserializer=handler.request_deserializer,
                     response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, method), **codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, method), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._responses(handler.unary_stream, method), **codec)
        return grpc.stream_stream_rpc_method_handler(self._responses(handler.stream_stream, method), **codec)

    def _unary(self, behavior, method: str):
        audited = self.audit is not None and method in MUTATING_ADMIN_METHODS
        checked = self.authenticator.enabled

        async def wrapped(request, context):
            who = None
            try:
                if checked:
                    who = self.authenticator.identify(context)
                    if not self.table.allows(who.role, method):
                        raise refusal(who, method, self.table)
                response = await behavior(request, context)
            except MeshError as err:
                if audited:
                    self.audit(who, method, request, err.code.name, err.message)
                raise
            except grpc.aio.AbortError:
                if audited:
                    code = context.code()
                    self.audit(who, method, request, getattr(code, "name", str(code)), context.details() or "")
                raise
            except Exception as err:
                if audited:
                    self.audit(who, method, request, grpc.StatusCode.INTERNAL.name, type(err).__name__)
                raise
            if audited:
                self.audit(who, method, request, grpc.StatusCode.OK.name, "")
            return response
        return wrapped

    def _responses(self, behavior, method: str):
        if not inspect.isasyncgenfunction(behavior):
            return self._unary(behavior, method)   # a coroutine that writes with context.write

        async def wrapped(request, context):
            self.admit(method, context)
            async for response in behavior(request, context):
                yield response
        return wrapped


# -- flags ----------------------------------------------------------------------------------------


def add_auth_arguments(parser: argparse.ArgumentParser, *, data_plane: bool) -> None:
    """``--token-file`` (and for a runtime or proxy ``--restrict``), in their own help group."""
    group = parser.add_argument_group(
        "authentication", "On with --tls-require-client-cert or a token file; off (everyone allowed) otherwise.")
    group.add_argument("--token-file", metavar="FILE",
                       help=f"bearer tokens this server accepts, lines 'sha256:<hex> ROLE NAME' "
                            f"(`scheduler ctl tokens create`) (${ENV_TOKEN_FILE})")
    if data_plane:
        group.add_argument("--restrict", action="append", default=[], metavar="GROUP=ROLE[,ROLE]",
                           help="roles that may call an endpoint group (inference, metadata, health, statistics, "
                                "model-repository, shared-memory, settings); admin always may (repeatable)")


def authenticator_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, tls,
                            environ: Mapping[str, str] | None = None) -> Authenticator:
    """The Authenticator the flags (and ``tls``) ask for; a bad token file is a usage error (exit 2)."""
    environ = os.environ if environ is None else environ
    path = getattr(args, "token_file", None) or environ.get(ENV_TOKEN_FILE) or None
    try:
        tokens = TokenTable(path) if path else None
    except TokenError as err:
        parser.error(str(err))
    return Authenticator(certificates=bool(tls and tls.require_client_cert), tokens=tokens)


def data_plane_table_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RoleTable:
    try:
        return data_plane_table(parse_restrict(getattr(args, "restrict", None) or ()))
    except ValueError as err:
        parser.error(str(err))


__all__ = ["Audit", "AuthInterceptor", "Authenticator", "add_auth_arguments", "authenticator_from_args",
           "data_plane_table_from_args", "refusal"]
