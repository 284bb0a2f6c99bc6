"""``scheduler ctl certs``: a cluster CA and per-component certificates, for people who have no PKI.

    scheduler ctl certs init  --dir DIR [--days 3650] [--force]
    scheduler ctl certs issue --dir DIR --name NAME --role ROLE [--san HOST_OR_IP ...] [--days 365]

``init`` writes DIR/ca.pem (give it to every component as --tls-ca) and
DIR/ca-key.pem (keep it on the machine that issues certificates). ``issue``
writes DIR/NAME.pem and DIR/NAME-key.pem, signed by that CA, with:

- subject CN = NAME, and one URI SAN ``meshserve://ROLE/NAME``: the identity
  (``protos.security.identity``); ROLE is admin, viewer, agent, proxy, client
  or scheduler;
- DNS and IP SANs: ``localhost`` and ``127.0.0.1`` always, NAME when it is a
  host name, and every ``--san`` (an IP address or a DNS name) — every name
  or address peers dial this component at;
- extended key usage serverAuth and clientAuth: every component both serves
  and calls out.

Keys are ECDSA P-256 (fast handshakes); private keys are written 0600.
Files are written to a temporary name and renamed into place, so a running
server that re-reads them (rotation) never sees half a file. The openssl
equivalent is in the README ("Security").
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import pathlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshserve.common.security.identity import ROLES, identity

CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
DEFAULT_SANS = ("localhost", "127.0.0.1")
# A CA outlives many component certificates; ten years, as kubeadm's.
CA_DAYS = 3650
# One year: long enough to be no chore, short enough that a leaked key expires (kubeadm's default too).
CERT_DAYS = 365
ORGANIZATION = "meshserve"


@dataclass(frozen=True)
class IssuedFiles:
    cert: pathlib.Path
    key: pathlib.Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: pathlib.Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` from the first byte on, replacing it atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # os.open's mode is masked by the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def create_ca(directory: str | os.PathLike, *, days: int = CA_DAYS, force: bool = False,
              common_name: str = "meshserve cluster CA") -> IssuedFiles:
    """Write DIR/ca.pem and DIR/ca-key.pem (0600); FileExistsError if a CA is there and not ``force``."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = IssuedFiles(directory / CA_CERT, directory / CA_KEY)
    if not force and (files.cert.exists() or files.key.exists()):
        raise FileExistsError(f"{files.key} already exists: every certificate issued so far chains to it "
                              f"(--force replaces it)")
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(files.key, _key_pem(key), 0o600)
    _write(files.cert, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def _subject_names(name: str, sans: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    candidates = [*DEFAULT_SANS, *sans]
    try:
        ipaddress.ip_address(name)
    except ValueError:
        candidates.insert(0, name)          # a node name is usually its host name
    for value in dict.fromkeys(v.strip() for v in candidates if v.strip()):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(value.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(value))
    return names


def issue_certificate(directory: str | os.PathLike, name: str, role: str, sans: Sequence[str] = (), *,
                      days: int = CERT_DAYS, not_before: datetime.datetime | None = None,
                      not_after: datetime.datetime | None = None,
                      out: str | os.PathLike | None = None) -> IssuedFiles:
    """Sign a certificate for ``name`` in ``role`` with the CA in ``directory``; write OUT/NAME.pem and NAME-key.pem.

    ``not_before``/``not_after`` override ``days`` (tests issue expired certificates with them).
    """
    who = identity(role, name)
    directory = pathlib.Path(directory)
    ca_cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):   # what `init` writes
        raise ValueError(f"{directory / CA_KEY} holds a {type(ca_key).__name__}, not the CA's EC private key")
    key = _new_key()
    now = _now()
    start = not_before or now - datetime.timedelta(minutes=5)
    end = not_after or now + datetime.timedelta(days=days)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [*_subject_names(name, sans), x509.UniformResourceIdentifier(who.uri)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out_dir = pathlib.Path(out) if out else directory
    out_dir.mkdir(parents=True, exist_ok=True)
    files = IssuedFiles(out_dir / f"{name}.pem", out_dir / f"{name}-key.pem")
    _write(files.key, _key_pem(key), 0o600)
    _write(files.cert, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def _positive_days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1 day")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scheduler ctl certs", description=__doc__.split("\n\n")[0],
                                     epilog="See README, Security, for the openssl equivalent.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    init = verbs.add_parser("init", help="create the cluster CA (DIR/ca.pem, DIR/ca-key.pem)")
    init.add_argument("--dir", required=True, help="where the CA is kept")
    init.add_argument("--days", type=_positive_days, default=CA_DAYS)
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    issue = verbs.add_parser("issue", help="issue a component's certificate (DIR/NAME.pem, DIR/NAME-key.pem)")
    issue.add_argument("--dir", required=True, help="the CA's folder (from certs init)")
    issue.add_argument("--name", required=True, help="component name; an agent's is its node name")
    issue.add_argument("--role", required=True, choices=ROLES)
    issue.add_argument("--san", action="append", default=[], metavar="HOST_OR_IP",
                       help="another DNS name or IP address peers dial it at (repeatable; "
                            f"{' and '.join(DEFAULT_SANS)} are always included)")
    issue.add_argument("--days", type=_positive_days, default=CERT_DAYS)
    issue.add_argument("--out", help="where to write the certificate and key (default: --dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``scheduler ctl certs ...``; exit 0 done, 1 failed, 2 usage."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        if args.verb == "init":
            files = create_ca(args.dir, days=args.days, force=args.force)
            print(f"CA certificate {files.cert} (give to every component as --tls-ca)\n"
                  f"CA key         {files.key} (0600; keep it where certificates are issued)")
        else:
            files = issue_certificate(args.dir, args.name, args.role, args.san, days=args.days, out=args.out)
            print(f"certificate {files.cert} (--tls-cert)\nkey         {files.key} (--tls-key, 0600)\n"
                  f"identity    meshserve://{args.role}/{args.name}")
    except (OSError, ValueError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
