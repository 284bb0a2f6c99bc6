"""How the scheduler reaches a secured etcd: TLS (etcd's --cert-file / --trusted-ca-file /
--client-cert-auth) and etcd's user/password authentication.

    scheduler serve --store etcd://10.0.0.1:2379 \\
        --etcd-ca ca.pem [--etcd-cert client.pem --etcd-key client-key.pem] \\
        [--etcd-user meshserve --etcd-password-file /etc/meshserve/etcd-password]

Each flag falls back to MESHSERVE_ETCD_CA, _CERT, _KEY, _USER, _PASSWORD_FILE;
MESHSERVE_ETCD_PASSWORD gives the password itself (a password is never a flag:
``ps`` would show it). etcd's CA is its own (``--etcd-ca``), apart from the
mesh's ``--tls-ca``: etcd clusters usually have their own PKI.

aetcd 1.0 opens only plaintext channels, so ``TlsEtcdClient`` is aetcd's own
``connect`` with the channel made secure: the password then never crosses
the network in clear (aetcd's Authenticate runs on that channel).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass

import aetcd
import grpc
from aetcd import rpc, watcher

ENV_CA, ENV_CERT, ENV_KEY = "MESHSERVE_ETCD_CA", "MESHSERVE_ETCD_CERT", "MESHSERVE_ETCD_KEY"
ENV_USER, ENV_PASSWORD_FILE, ENV_PASSWORD = "MESHSERVE_ETCD_USER", "MESHSERVE_ETCD_PASSWORD_FILE", \
    "MESHSERVE_ETCD_PASSWORD"


@dataclass(frozen=True)
class EtcdSecurity:
    ca: str | None = None           # etcd's CA bundle: turns TLS on
    cert: str | None = None         # client certificate, for etcd's --client-cert-auth
    key: str | None = None
    user: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert)

    def validate(self) -> None:
        """ValueError naming the setting that cannot work."""
        if bool(self.cert) != bool(self.key):
            raise ValueError("--etcd-cert and --etcd-key go together: give both or neither")
        if bool(self.user) != (self.password is not None):
            raise ValueError("etcd authentication needs both --etcd-user and a password "
                             f"(--etcd-password-file or ${ENV_PASSWORD})")
        for path in (self.ca, self.cert, self.key):
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"etcd TLS file {path} cannot be read")

    def channel_credentials(self) -> grpc.ChannelCredentials:
        def read(path):
            if not path:
                return None
            with open(path, "rb") as f:
                return f.read()
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))

    def client(self, host: str, port: int, **options) -> aetcd.Client:
        """An aetcd client for one endpoint with these settings (files are read now)."""
        auth = {"username": self.user, "password": self.password} if self.user else {}
        if self.tls:
            return TlsEtcdClient(host, port, credentials=self.channel_credentials(), **auth, **options)
        return aetcd.Client(host, port, **auth, **options)


class TlsEtcdClient(aetcd.Client):
    """``aetcd.Client`` over a TLS channel (aetcd 1.0.0's ``connect``, with ``secure_channel``)."""

    _is_connecting: bool   # aetcd.Client's (it has no type information)

    def __init__(self, *args, credentials: grpc.ChannelCredentials, **kwargs):
        super().__init__(*args, **kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            self.channel = rpc.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                              options=self._options.items())
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                response = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
                self.metadata = (("token", response.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)
            self._connected.set()
        except BaseException:
            if self.channel is not None:
                await self.channel.close()
                self.channel = None
            raise
        finally:
            self._is_connecting = False


def add_etcd_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("etcd security", "for --store etcd://...; each flag falls back to its "
                                                       "MESHSERVE_ETCD_* variable")
    group.add_argument("--etcd-ca", metavar="FILE", help=f"etcd's CA bundle: TLS to etcd (${ENV_CA})")
    group.add_argument("--etcd-cert", metavar="FILE", help=f"client certificate for etcd (${ENV_CERT})")
    group.add_argument("--etcd-key", metavar="FILE", help=f"its key (${ENV_KEY})")
    group.add_argument("--etcd-user", help=f"etcd user (${ENV_USER})")
    group.add_argument("--etcd-password-file", metavar="FILE",
                       help=f"file holding the etcd user's password (${ENV_PASSWORD_FILE}; or ${ENV_PASSWORD})")


def etcd_security_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> EtcdSecurity:
    """The flags, each falling back to its variable; ValueError naming a setting that cannot work."""
    environ = os.environ if environ is None else environ
    password_file = args.etcd_password_file or environ.get(ENV_PASSWORD_FILE)
    password = environ.get(ENV_PASSWORD)
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        except OSError as err:
            raise ValueError(f"--etcd-password-file {password_file}: {err.strerror or err}") from None
    security = EtcdSecurity(ca=args.etcd_ca or environ.get(ENV_CA), cert=args.etcd_cert or environ.get(ENV_CERT),
                            key=args.etcd_key or environ.get(ENV_KEY), user=args.etcd_user or environ.get(ENV_USER),
                            password=password)
    security.validate()
    return security
