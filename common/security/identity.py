"""Who a certificate says its holder is: one URI SAN ``meshserve://ROLE/NAME``.

``scheduler ctl certs issue`` writes exactly one such URI into every
certificate it issues (the subject's CN is NAME too, for people reading
``openssl x509 -text``; only the URI counts). ROLE is one of ``ROLES``; NAME
is the component's name — for an agent, its node name. A certificate with no
such URI, or more than one, has no meshserve identity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "meshserve"
# admin: changes the mesh; viewer: reads it; agent: a node; proxy: follows routes and forwards;
# client: inference; scheduler: the scheduler's own (server) certificate.
ROLES = ("admin", "viewer", "agent", "proxy", "client", "scheduler")
# A node or component name: a host name's characters, nothing that could be read as a path.
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")
_URI = re.compile(rf"{SCHEME}://([a-z]+)/(.+)")


@dataclass(frozen=True)
class Identity:
    role: str
    name: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}://{self.role}/{self.name}"

    def __str__(self) -> str:
        return f"{self.name} ({self.role})"


def check_name(name: str) -> str:
    """``name`` if it is a plain component name (letters, digits, ``.``, ``_``, ``-``); ValueError otherwise."""
    if not _NAME.fullmatch(name or "") or ".." in name:
        raise ValueError(f"name {name!r}: use letters, digits, '.', '_' and '-' (a host name), "
                         f"starting and ending with a letter or digit")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role {role!r}: one of {', '.join(ROLES)}")
    return role


def identity(role: str, name: str) -> Identity:
    """A checked identity; ValueError naming what is wrong."""
    return Identity(check_role(role), check_name(name))


def parse_uri(uri: str) -> Identity | None:
    """The identity a ``meshserve://ROLE/NAME`` URI names; None for any other URI or a bad role or name."""
    match = _URI.fullmatch(uri)
    if not match:
        return None
    try:
        return identity(match.group(1), match.group(2))
    except ValueError:
        return None


def from_certificate(pem: bytes) -> Identity | None:
    """The identity in the first certificate of a PEM chain (exactly one meshserve URI SAN), else None."""
    from cryptography import x509

    certificate = x509.load_pem_x509_certificate(pem)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    found = [parse_uri(uri) for uri in names.get_values_for_type(x509.UniformResourceIdentifier)
             if uri.startswith(f"{SCHEME}://")]
    return found[0] if len(found) == 1 else None
