"""TLS on every gRPC hop: one set of flags and environment variables, server and channel credentials.

The same settings on every daemon (runtime, proxy, scheduler serve and ctl,
node agent) and in the client library; a flag wins over its variable:

    --tls-cert FILE             MESHSERVE_TLS_CERT          this process's certificate (PEM, chain allowed)
    --tls-key FILE              MESHSERVE_TLS_KEY           its private key (PEM)
    --tls-ca FILE               MESHSERVE_TLS_CA            CA bundle peers' certificates must chain to
    --tls-client-cert FILE      MESHSERVE_TLS_CLIENT_CERT   presented when this process calls out
                                                            (default: --tls-cert)
    --tls-client-key FILE       MESHSERVE_TLS_CLIENT_KEY    (default: --tls-key)
    --tls-require-client-cert   MESHSERVE_TLS_REQUIRE_CLIENT_CERT=1
                                                            a server refuses callers without a
                                                            certificate the CA signed (mutual TLS)
    --insecure                  MESHSERVE_INSECURE=1        allow plaintext on a non-loopback address

Guarantees:
- With no TLS setting a process is plaintext, and a server refuses to
  listen in plaintext on anything but loopback unless ``insecure`` (an
  explicit choice for a trusted network). Any TLS setting makes the process
  TLS on both sides: its servers need ``cert`` and ``key``, and every
  channel it opens verifies the peer against ``ca`` (the system roots when
  no ``ca`` is given) and presents the client certificate when there is one.
- Inconsistent settings (a cert without its key, a required client
  certificate without a CA to check it, a key that does not match its
  certificate, an unreadable file) raise ``TlsError`` naming the setting,
  before anything listens.
- Rotation without a restart: a server re-reads its certificate, key and CA
  bundle when a file's mtime, size or inode changes, checked before each new
  connection's handshake (grpc's dynamic server credentials). A half-written
  pair (key not matching the certificate, an empty or unparsable file) is
  not used: the previous files stay in force until the pair is whole, and
  the problem is logged once. Replace files by renaming over them. Channels
  read the files when they are opened: a channel opened after a rotation
  uses the new files; one opened before keeps the files it was opened with,
  across reconnects too.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import grpc

from meshserve.common.listen import bind

log = logging.getLogger(__name__)

ENV_CERT = "MESHSERVE_TLS_CERT"
ENV_KEY = "MESHSERVE_TLS_KEY"
ENV_CA = "MESHSERVE_TLS_CA"
ENV_CLIENT_CERT = "MESHSERVE_TLS_CLIENT_CERT"
ENV_CLIENT_KEY = "MESHSERVE_TLS_CLIENT_KEY"
ENV_REQUIRE_CLIENT_CERT = "MESHSERVE_TLS_REQUIRE_CLIENT_CERT"
ENV_INSECURE = "MESHSERVE_INSECURE"

# field -> (flag, environment variable); one definition for the parser, the environment and child processes.
_SETTINGS = {
    "cert": ("--tls-cert", ENV_CERT),
    "key": ("--tls-key", ENV_KEY),
    "ca": ("--tls-ca", ENV_CA),
    "client_cert": ("--tls-client-cert", ENV_CLIENT_CERT),
    "client_key": ("--tls-client-key", ENV_CLIENT_KEY),
    "require_client_cert": ("--tls-require-client-cert", ENV_REQUIRE_CLIENT_CERT),
    "insecure": ("--insecure", ENV_INSECURE),
}
ENVIRONMENT_VARIABLES = tuple(env for _, env in _SETTINGS.values())
_TRUE = ("1", "true", "yes", "on")
_LOOPBACK_NAMES = ("localhost",)


class TlsError(ValueError):
    """TLS settings that cannot work; the message names the flag or file."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; wildcards and other names are not loopback."""
    host = host.strip("[]")
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(address: str) -> str:
    host, _, _ = address.rpartition(":")
    return host


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise TlsError(f"{what} {path}: {err.strerror or err}") from None
    if not data.strip():
        raise TlsError(f"{what} {path} is empty")
    return data


def _check_pair(cert_pem: bytes, key_pem: bytes, cert_path: str, key_path: str) -> None:
    """Raise TlsError unless ``key_pem`` is the private key of the first certificate in ``cert_pem``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as err:
        raise TlsError(f"certificate {cert_path} is not a PEM certificate: {err}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise TlsError(f"key {key_path} is not an unencrypted PEM private key: {err}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise TlsError(f"key {key_path} does not match certificate {cert_path}")


@dataclass(frozen=True)
class TlsConfig:
    """Where this process's TLS files are; file contents are read when credentials are built."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    require_client_cert: bool = False
    insecure: bool = False

    # -- building -----------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TlsConfig:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, (_, env) in _SETTINGS.items():
            text = environ.get(env, "")
            if name in ("require_client_cert", "insecure"):
                values[name] = text.strip().lower() in _TRUE
            else:
                values[name] = text or None
        return cls(**values)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> TlsConfig:
        """The flags of ``add_tls_arguments``, each falling back to its environment variable; validated."""
        from_env = cls.from_env(environ)
        values = {f.name: getattr(args, f"tls_{f.name}" if f.name != "insecure" else "insecure", None)
                  or getattr(from_env, f.name) for f in fields(cls)}
        config = cls(**values)
        config.validate()
        return config

    def as_environment(self) -> dict[str, str]:
        """These settings as environment variables, for a child process (``from_env`` reads them back)."""
        env = {}
        for name, (_, variable) in _SETTINGS.items():
            value = getattr(self, name)
            if value:
                env[variable] = "1" if value is True else os.path.abspath(value)
        return env

    # -- what it means --------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Any TLS setting: the process serves and dials TLS."""
        return bool(self.cert or self.key or self.ca or self.client_cert or self.client_key
                    or self.require_client_cert)

    def validate(self) -> None:
        """Raise TlsError for settings that cannot work; read every named file once."""
        if bool(self.cert) != bool(self.key):
            raise TlsError("--tls-cert and --tls-key go together: give both or neither")
        if bool(self.client_cert) != bool(self.client_key):
            raise TlsError("--tls-client-cert and --tls-client-key go together: give both or neither")
        if self.require_client_cert and not self.ca:
            raise TlsError("--tls-require-client-cert needs --tls-ca: the CA bundle that client certificates "
                           "must chain to")
        if self.cert and self.key:   # both or neither, checked above
            _check_pair(_read(self.cert, "--tls-cert"), _read(self.key, "--tls-key"), self.cert, self.key)
        if self.client_cert and self.client_key:
            _check_pair(_read(self.client_cert, "--tls-client-cert"), _read(self.client_key, "--tls-client-key"),
                        self.client_cert, self.client_key)
        if self.ca:
            _read(self.ca, "--tls-ca")

    def describe(self) -> str:
        """One line for a startup message: "TLS", "mutual TLS" or "plaintext"."""
        if not self.enabled:
            return "plaintext"
        return "mutual TLS" if self.require_client_cert else "TLS"

    # -- credentials ----------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """Credentials that re-read the files when they change; None for plaintext.

        Raises TlsError when TLS is configured but this process has no certificate to serve with.
        """
        if not self.enabled:
            return None
        if not (self.cert and self.key):
            raise TlsError("a TLS server needs its own certificate: give --tls-cert and --tls-key "
                           "(or no TLS setting at all for plaintext on loopback)")
        reloader = CertificateReloader(self.cert, self.key, self.ca)
        return grpc.dynamic_ssl_server_credentials(
            reloader.initial, reloader,  # type: ignore[arg-type]  # grpc takes None ("no change"); its stubs do not
            require_client_authentication=self.require_client_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """Credentials from the files as they are now; None for plaintext."""
        if not self.enabled:
            return None
        cert, key = (self.client_cert, self.client_key) if self.client_cert else (self.cert, self.key)
        if bool(cert) != bool(key):
            raise TlsError("a client certificate needs its key (and a key its certificate): give both or neither")
        root = _read(self.ca, "--tls-ca") if self.ca else None
        chain = _read(cert, "client certificate") if cert else None
        private = _read(key, "client key") if key else None
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=private, certificate_chain=chain)


class CertificateReloader:
    """grpc's certificate-configuration fetcher: a new configuration when the files changed, else None.

    grpc calls it before every new connection's handshake, from its own
    threads; a ``stat`` of three files is all it costs when nothing changed.
    """

    def __init__(self, cert: str, key: str, ca: str | None):
        self.paths = (cert, key) + ((ca,) if ca else ())
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.initial = self._load()          # raises TlsError: a server does not start with bad files
        self._failed_stamp: tuple | None = None
        self.reloads = 0

    def _stat(self) -> tuple:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self.paths:
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert_path, key_path = self.paths[0], self.paths[1]
        cert, key = _read(cert_path, "--tls-cert"), _read(key_path, "--tls-key")
        _check_pair(cert, key, cert_path, key_path)
        ca = _read(self.paths[2], "--tls-ca") if len(self.paths) > 2 else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            with self._lock:
                stamp = self._stat()
                if stamp == self._stamp or stamp == self._failed_stamp:
                    return None
                try:
                    configuration = self._load()
                except TlsError as err:
                    self._failed_stamp = stamp   # logged once per state of the files
                    log.warning("TLS files changed but cannot be used yet (%s); the previous certificate "
                                "stays in force", err)
                    return None
                self._stamp, self._failed_stamp = stamp, None
                self.reloads += 1
            log.info("TLS: certificate %s reloaded from disk", self.paths[0])
            return configuration
        except Exception:  # noqa: BLE001 - grpc's thread must get an answer; the old files stay in force
            log.exception("TLS: checking %s for a new certificate failed", self.paths[0])
            return None


# -- flags ----------------------------------------------------------------------------------------


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """The TLS flags, in their own help group; read them back with ``TlsConfig.from_args``."""
    group = parser.add_argument_group(
        "TLS", "Each flag falls back to its MESHSERVE_TLS_* variable. No TLS setting: plaintext, on "
               "loopback only unless --insecure.")
    group.add_argument("--tls-cert", metavar="FILE", help=f"this process's certificate, PEM (${ENV_CERT})")
    group.add_argument("--tls-key", metavar="FILE", help=f"its private key, PEM (${ENV_KEY})")
    group.add_argument("--tls-ca", metavar="FILE",
                       help=f"CA bundle that peers' certificates must chain to (${ENV_CA})")
    group.add_argument("--tls-client-cert", metavar="FILE",
                       help=f"certificate presented when calling out; default --tls-cert (${ENV_CLIENT_CERT})")
    group.add_argument("--tls-client-key", metavar="FILE",
                       help=f"its key; default --tls-key (${ENV_CLIENT_KEY})")
    group.add_argument("--tls-require-client-cert", action="store_true", default=None,
                       help=f"mutual TLS: refuse callers without a certificate the CA signed "
                            f"(${ENV_REQUIRE_CLIENT_CERT}=1)")
    group.add_argument("--insecure", action="store_true", default=None,
                       help=f"allow plaintext on a non-loopback address: only on a network you trust "
                            f"(${ENV_INSECURE}=1)")


def tls_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, *listen: str) -> TlsConfig:
    """``TlsConfig.from_args``, checked against the addresses this process will ``listen`` on.

    A bad setting, or plaintext on a non-loopback address without --insecure, is a usage error of
    ``parser`` (exit 2, one line) before anything starts.
    """
    try:
        config = TlsConfig.from_args(args)
        for address in listen:
            check_listen(address, config)
        return config
    except TlsError as err:
        parser.error(str(err))


# -- servers and channels -------------------------------------------------------------------------


def add_port(server: grpc.Server | grpc.aio.Server, address: str, tls: TlsConfig | None) -> str:
    """Bind ``address`` with TLS when ``tls`` says so, else in plaintext; returns ``HOST:PORT`` bound.

    Raises TlsError for plaintext on a non-loopback address without ``insecure``,
    ``ListenError`` when the port is taken (protos/listen.py: never shared).
    """
    tls = tls or TlsConfig()
    check_listen(address, tls)
    log.info("serving %s on %s", tls.describe(), address)
    return bind(server, address, tls.server_credentials())


def check_listen(address: str, tls: TlsConfig) -> None:
    """Raise TlsError for plaintext on a non-loopback ``address`` unless ``tls.insecure``."""
    if not tls.enabled and not tls.insecure and not is_loopback(_host_of(address)):
        raise TlsError(f"refusing to serve plaintext on {address}: give --tls-cert/--tls-key (and --tls-ca), "
                       f"listen on 127.0.0.1, or pass --insecure for a network you trust")


def aio_channel(target: str, tls: TlsConfig | None,
                options: Sequence[tuple[str, Any]] | None = None,
                interceptors: Sequence[Any] | None = None) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to ``target``: TLS with the current files when ``tls`` is enabled.

    ``interceptors``: client interceptors, e.g. ``tokens.aio_token_interceptors`` (a bearer token)."""
    credentials = tls.channel_credentials() if tls else None
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


def sync_channel(target: str, tls: TlsConfig | None,
                 options: Sequence[tuple[str, Any]] | None = None) -> grpc.Channel:
    """A blocking channel to ``target``: TLS with the current files when ``tls`` is enabled."""
    credentials = tls.channel_credentials() if tls else None
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def without_tls_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` less every TLS variable: a child gets only the TLS settings its parent decides."""
    return {k: v for k, v in env.items() if k not in ENVIRONMENT_VARIABLES}


def as_flags(config: TlsConfig) -> list[str]:
    """``config`` as command-line flags (for documentation and tests; children get ``as_environment``)."""
    argv: list[str] = []
    for name, (flag, _) in _SETTINGS.items():
        value = getattr(config, name)
        if value is True:
            argv.append(flag)
        elif value:
            argv += [flag, value]
    return argv


__all__ = ["ENVIRONMENT_VARIABLES", "CertificateReloader", "TlsConfig", "TlsError", "add_port", "add_tls_arguments",
           "aio_channel", "as_flags", "is_loopback", "sync_channel", "tls_from_args", "without_tls_environment"]
