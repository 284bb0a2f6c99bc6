"""scheduler -> etcd over TLS with a client certificate, and etcd's user/password authentication,
against a real etcd started with --cert-file/--key-file/--trusted-ca-file/--client-cert-auth.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time

import pytest
from etcd_server import ETCD, START_TIMEOUT_S, STOP_TIMEOUT_S, free_port, require_etcd
from mesh_harness import Process
from tls_pki import Pki

from meshserve.common.security.tls import as_flags
from meshserve.scheduler.store import StoreError
from meshserve.scheduler.store.etcd import EtcdStore
from meshserve.scheduler.store.etcd_security import EtcdSecurity

# A call to a healthy loopback etcd answers in milliseconds; a short timeout keeps the refusals quick.
CALL_TIMEOUT_S = 2.0


class TlsEtcd:
    """One etcd member serving clients only over TLS, requiring a certificate its CA signed."""

    def __init__(self, pki: Pki):
        require_etcd()
        self.pki = pki
        self.data_dir = tempfile.mkdtemp(prefix="meshserve-etcd-tls-")
        server = pki.issue("etcd", "scheduler")
        self.client = pki.issue("scheduler-1", "scheduler")
        port, peer = free_port(), free_port()
        self.endpoint = f"127.0.0.1:{port}"
        self.log = open(os.path.join(self.data_dir, "etcd.log"), "ab")
        self.proc = subprocess.Popen(
            [ETCD, "--name", "s1", "--data-dir", os.path.join(self.data_dir, "s1"),
             "--listen-client-urls", f"https://{self.endpoint}", "--advertise-client-urls", f"https://{self.endpoint}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls",
             f"http://127.0.0.1:{peer}", "--initial-cluster", f"s1=http://127.0.0.1:{peer}",
             "--cert-file", str(server.cert), "--key-file", str(server.key), "--trusted-ca-file", pki.ca,
             "--client-cert-auth", "--log-level", "warn", "--logger", "zap"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def security(self, **auth) -> EtcdSecurity:
        return EtcdSecurity(ca=self.pki.ca, cert=str(self.client.cert), key=str(self.client.key), **auth)

    async def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                store = await EtcdStore.open([self.endpoint], timeout_s=CALL_TIMEOUT_S, security=self.security())
                await store.close()
                return
            except StoreError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                await asyncio.sleep(0.1)   # etcd is another process: nothing to await but its answer

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture
def etcd(tmp_path):
    server = TlsEtcd(Pki(tmp_path / "ca"))
    try:
        asyncio.run(server.wait_healthy())
        yield server
    finally:
        server.close()


async def _round_trip(endpoint: str, security: EtcdSecurity | None) -> bytes:
    store = await EtcdStore.open([endpoint], timeout_s=CALL_TIMEOUT_S, security=security)
    try:
        await store.put("/tls-test/key", b"value")
        return (await store.get("/tls-test/key")).value
    finally:
        await store.close()


def test_store_reaches_etcd_over_tls_with_a_client_certificate(etcd):
    assert asyncio.run(_round_trip(etcd.endpoint, etcd.security())) == b"value"


def test_etcd_refuses_plaintext_a_missing_client_certificate_and_another_ca(etcd, tmp_path):
    stranger = Pki(tmp_path / "other-ca").issue("scheduler-1", "scheduler")
    for security in (None, EtcdSecurity(ca=etcd.pki.ca),
                     EtcdSecurity(ca=etcd.pki.ca, cert=str(stranger.cert), key=str(stranger.key))):
        with pytest.raises(StoreError, match="no etcd endpoint answered"):
            asyncio.run(_round_trip(etcd.endpoint, security))


async def _enable_auth(etcd: TlsEtcd, user: str, password: str) -> None:
    """etcdctl's user add / role add / user grant-role / auth enable, over the TLS channel."""
    from aetcd import rpc

    channel = rpc.secure_channel(etcd.endpoint, etcd.security().channel_credentials())
    auth = rpc.AuthStub(channel)
    try:
        for name, secret in (("root", "root-password"), (user, password)):
            await auth.UserAdd(rpc.AuthUserAddRequest(name=name, password=secret), timeout=CALL_TIMEOUT_S)
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"), timeout=CALL_TIMEOUT_S)
        for name in ("root", user):
            await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=name, role="root"), timeout=CALL_TIMEOUT_S)
        await auth.AuthEnable(rpc.AuthEnableRequest(), timeout=CALL_TIMEOUT_S)
    finally:
        await channel.close()


def test_store_authenticates_to_etcd_with_user_and_password_over_tls(etcd):
    asyncio.run(_enable_auth(etcd, "meshserve", "s3cret"))
    assert asyncio.run(_round_trip(etcd.endpoint, etcd.security(user="meshserve", password="s3cret"))) == b"value"
    with pytest.raises(StoreError, match="authentication failed"):
        asyncio.run(_round_trip(etcd.endpoint, etcd.security(user="meshserve", password="wrong")))


def test_scheduler_serve_uses_etcd_tls_and_password_from_flags_and_environment(etcd, tmp_path):
    asyncio.run(_enable_auth(etcd, "meshserve", "s3cret"))
    password_file = tmp_path / "etcd-password"
    password_file.write_text("s3cret\n")
    scheduler = Process("scheduler", [
        "-m", "meshserve.scheduler", "serve", "--listen", "127.0.0.1:0", "--store", f"etcd://{etcd.endpoint}", "--id", "s1",
        "--etcd-ca", etcd.pki.ca, "--etcd-user", "meshserve", "--etcd-password-file", str(password_file),
        *as_flags(etcd.pki.tls("scheduler-1", "scheduler"))],
        env={"MESHSERVE_ETCD_CERT": str(etcd.client.cert), "MESHSERVE_ETCD_KEY": str(etcd.client.key)})
    try:
        scheduler.wait_listening()      # printed only once the store answered
        deadline = time.monotonic() + START_TIMEOUT_S
        while "leads" not in "".join(scheduler.output) and time.monotonic() < deadline:
            time.sleep(0.1)             # another process's log: nothing to await
        assert "leads" in "".join(scheduler.output), "".join(scheduler.output)
    finally:
        scheduler.stop()
