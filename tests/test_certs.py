"""``scheduler ctl certs``: a cluster CA and per-component certificates with the identity URI and SANs."""

from __future__ import annotations

import ipaddress
import pathlib
import stat
import subprocess
import sys

from cryptography import x509

from meshserve.common.security.identity import Identity, from_certificate, parse_uri
from meshserve.common.security.tls import TlsConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _certs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshserve.scheduler", "ctl", "certs", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def test_certs_init_and_issue_write_a_ca_and_a_component_certificate_with_identity_and_sans(tmp_path):
    pki = tmp_path / "pki"
    assert _certs("init", "--dir", str(pki)).returncode == 0
    issued = _certs("issue", "--dir", str(pki), "--name", "gpu-7", "--role", "agent", "--san", "10.0.0.7",
                    "--san", "gpu-7.example")
    assert issued.returncode == 0, issued.stderr
    assert "meshserve://agent/gpu-7" in issued.stdout

    for key in ("ca-key.pem", "gpu-7-key.pem"):
        assert stat.S_IMODE((pki / key).stat().st_mode) == 0o600
    pem = (pki / "gpu-7.pem").read_bytes()
    assert from_certificate(pem) == Identity("agent", "gpu-7")
    certificate = x509.load_pem_x509_certificate(pem)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"gpu-7", "localhost", "gpu-7.example"}
    assert set(names.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                             ipaddress.ip_address("10.0.0.7")}
    assert certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "gpu-7"
    # The pair is usable as is: the key matches and the CA is readable.
    TlsConfig(cert=str(pki / "gpu-7.pem"), key=str(pki / "gpu-7-key.pem"), ca=str(pki / "ca.pem")).validate()


def test_certs_refuse_to_replace_a_ca_a_bad_role_or_a_name_that_is_not_plain(tmp_path):
    pki = tmp_path / "pki"
    assert _certs("init", "--dir", str(pki)).returncode == 0
    again = _certs("init", "--dir", str(pki))
    assert again.returncode == 1 and "already exists" in again.stderr and "--force" in again.stderr
    assert _certs("issue", "--dir", str(pki), "--name", "x", "--role", "root").returncode == 2
    bad_name = _certs("issue", "--dir", str(pki), "--name", "../evil", "--role", "agent")
    assert bad_name.returncode == 1 and "name '../evil'" in bad_name.stderr
    no_ca = _certs("issue", "--dir", str(tmp_path / "nowhere"), "--name", "a", "--role", "agent")
    assert no_ca.returncode == 1 and "error:" in no_ca.stderr and "Traceback" not in no_ca.stderr


def test_identity_uri_names_a_role_and_a_plain_name_only():
    assert parse_uri("meshserve://proxy/edge-1") == Identity("proxy", "edge-1")
    for uri in ("meshserve://god/x", "meshserve://agent/a/b", "meshserve://agent/..", "spiffe://agent/x",
                "meshserve://agent/"):
        assert parse_uri(uri) is None, uri
