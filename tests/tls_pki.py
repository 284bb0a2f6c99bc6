"""Certificates for the TLS tests, issued with ``scheduler ctl certs``' own functions; no tests here.

``Pki(folder)`` is one cluster CA in ``folder``; ``issue(name, role)`` a
certificate from it, ``tls(name, ...)`` the ``TlsConfig`` of a component
holding that certificate and trusting this CA.
"""

from __future__ import annotations

import datetime
import pathlib

from meshserve.common.security.tls import TlsConfig
from meshserve.scheduler.certs import IssuedFiles, create_ca, issue_certificate


class Pki:
    def __init__(self, folder: pathlib.Path):
        self.folder = pathlib.Path(folder)
        create_ca(self.folder)
        self.ca = str(self.folder / "ca.pem")

    def issue(self, name: str, role: str = "client", *, expired: bool = False) -> IssuedFiles:
        if expired:
            now = datetime.datetime.now(datetime.UTC)
            return issue_certificate(self.folder, name, role, not_before=now - datetime.timedelta(days=30),
                                     not_after=now - datetime.timedelta(days=1))
        return issue_certificate(self.folder, name, role)

    def tls(self, name: str | None = None, role: str = "client", *, require_client_cert: bool = False,
            expired: bool = False) -> TlsConfig:
        """A component trusting this CA, holding ``name``'s certificate (none when ``name`` is None)."""
        if name is None:
            return TlsConfig(ca=self.ca, require_client_cert=require_client_cert)
        files = self.issue(name, role, expired=expired)
        return TlsConfig(cert=str(files.cert), key=str(files.key), ca=self.ca,
                         require_client_cert=require_client_cert)
