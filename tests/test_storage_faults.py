"""Storage faults, injected for real: a SeaweedFS of this module's own that is killed and
restarted, and a stdlib TCP proxy in front of it that delays, fails, hangs or cuts requests.

What holds (each test says which figures it measured):
- server down when a job starts: the job fails within seconds with "cannot reach storage
  endpoint", and nothing is written (locally or, after the restart, in the bucket);
- server killed in the middle of a multipart upload: whether it comes back within the retry
  window or not, the upload either completes intact or fails with a clear error, and no reader
  (HEAD or GET, polled throughout) ever sees a truncated object;
- a connection cut mid-part is retried and the object lands intact;
- wrong keys, a missing bucket and a missing dataset object are reported clearly after ONE
  request each (permanent errors are not retried);
- slow or failing responses: transient ones (HTTP 500/503, read timeouts) are retried with
  backoff and succeed within a computed time bound; permanent ones stop after ``max_attempts``
  within a bound and say what happened.

``FAULTS`` counts every fault injected; the total is printed at the end of the module.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from audioldm.errors import StorageError
from audioldm.storage import MiB, S3Credentials, Storage
from helpers import s3_config, tone_dataset_zip
from s3server import SeaweedS3

FAULTS: dict[str, int] = {}


def injected(kind: str, count: int = 1) -> None:
    FAULTS[kind] = FAULTS.get(kind, 0) + count


# ---------------------------------------------------------------------------------------------
# A SeaweedFS that can be killed and brought back on the same ports with the same data
# ---------------------------------------------------------------------------------------------


class RestartableSeaweed(SeaweedS3):
    """SeaweedS3 whose process can be SIGKILLed and started again (same ports, same data dir)."""

    def kill(self) -> None:
        assert self._proc is not None and self._proc.poll() is None
        os.killpg(self._proc.pid, signal.SIGKILL)  # its own session: the whole weed group
        self._proc.wait(timeout=10)
        injected("server killed")

    def restart(self) -> float:
        assert self._proc is not None and self._proc.poll() is not None, "kill() it first"
        args, started = self._proc.args, time.monotonic()
        for stale in ("s3.sock", "filer.sock"):  # unix sockets a killed weed leaves behind
            (self._dir / stale).unlink(missing_ok=True)
        with open(self._log_path, "ab") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          cwd=self._dir, start_new_session=True)
        self._wait_ready(started)
        self._wait_writable(started)
        return time.monotonic() - started

    def _wait_writable(self, started: float) -> None:
        """After a restart the S3 API answers before its volume server takes writes again (the
        first PUTs fail and get retried): wait until a small write goes through."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(max_attempts=1, connect_timeout=0.5, read_timeout=2)
        try:
            client.create_bucket(Bucket="ready-probe")
        except ClientError:
            pass  # it exists from an earlier restart
        while True:
            try:
                client.put_object(Bucket="ready-probe", Key="probe", Body=b"x")
                return
            except (BotoCoreError, ClientError):
                assert time.monotonic() - started < self.startup_timeout, "SeaweedFS takes no writes after restart"
                time.sleep(0.05)

    @property
    def up(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


@pytest.fixture(scope="module")
def server() -> Iterator[RestartableSeaweed]:
    """This module's own S3 server (the session one is shared and must never be killed)."""
    with RestartableSeaweed() as s3:
        yield s3


@pytest.fixture(autouse=True)
def server_is_up(server: RestartableSeaweed) -> Iterator[None]:
    yield
    if not server.up:  # a failed test must not leave the next one without a server
        server.restart()


# ---------------------------------------------------------------------------------------------
# A fault-injecting HTTP/1.1 proxy (stdlib sockets)
# ---------------------------------------------------------------------------------------------


class FaultProxy:
    """Forwards HTTP requests to ``upstream``, one request per connection, and injects faults.

    ``plan`` says what to do with each request in turn (a list, consumed; then "pass"), or with
    every request (a string): "pass"; "delay:<s>" (answer that much later); "500" / "503" (answer
    InternalError / SlowDown without asking upstream); "hang" (never answer); "cut:<n>" (forward
    n bytes of the request body, then reset both connections). Uploads can be paced with
    ``throttle_bytes_per_s``. ``requests`` lists "METHOD /path?query" of every request seen.
    """

    def __init__(self, upstream_url: str, plan: list[str] | str = "pass",
                 throttle_bytes_per_s: float | None = None) -> None:
        host, port = re.match(r"http://([^:/]+):(\d+)", upstream_url).groups()
        self.upstream = (host, int(port))
        self.plan = plan
        self.throttle_bytes_per_s = throttle_bytes_per_s
        self.requests: list[str] = []
        self.body_bytes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def close(self) -> None:
        self._stop.set()
        self._sock.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def count(self, prefix: str) -> int:
        return sum(1 for request in self.requests if request.startswith(prefix))

    # -- internals ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(_Conn(client),), daemon=True).start()

    def _next_action(self, request: str) -> str:
        with self._lock:
            self.requests.append(request)
            action = self.plan if isinstance(self.plan, str) else (self.plan.pop(0) if self.plan else "pass")
        if action != "pass":
            injected(f"proxy {action.split(':')[0]}")
        return action

    def _serve(self, client: _Conn) -> None:
        upstream = None
        try:
            head = client.read_head()
            if head is None:
                return
            request_line, *headers = head.decode("latin-1").split("\r\n")
            method, target = request_line.split(" ")[:2]
            headers = [h for h in headers if h and not h.lower().startswith("connection:")]
            length = next((int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")), 0)
            expects_continue = any(h.lower().startswith("expect:") for h in headers)
            action = self._next_action(f"{method} {target}")
            if action == "hang":
                self._stop.wait(60)
                return
            if action in ("500", "503"):
                if not expects_continue:  # else the client waits for "100 Continue" and sends nothing
                    client.discard(length)
                code, reason = ("InternalError", "Internal Server Error") if action == "500" else \
                    ("SlowDown", "Service Unavailable")
                body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                client.sock.sendall(f"HTTP/1.1 {action} {reason}\r\nContent-Type: application/xml\r\n"
                                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
                return
            if action.startswith("delay:"):
                if self._stop.wait(float(action.split(":")[1])):
                    return
            upstream = socket.create_connection(self.upstream, timeout=30)
            upstream.sendall("\r\n".join([request_line, *headers, "Connection: close", "", ""]).encode("latin-1"))
            back = threading.Thread(target=_pipe, args=(upstream, client.sock), daemon=True)
            back.start()
            cut = int(action.split(":")[1]) if action.startswith("cut:") else None
            self._forward_body(client, upstream, length, cut)
            back.join(timeout=60)
        except OSError:
            pass
        finally:
            for sock in (client.sock, upstream):
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass

    def _forward_body(self, client: _Conn, upstream: socket.socket, length: int, cut: int | None) -> None:
        sent, started = 0, time.monotonic()
        while sent < length:
            data = client.recv(min(64 * 1024, length - sent))
            if not data:
                return
            if cut is not None and sent + len(data) >= cut:
                for sock in (client.sock, upstream):  # RST, as a dropped connection looks
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
                return
            upstream.sendall(data)
            sent += len(data)
            with self._lock:
                self.body_bytes += len(data)
            if self.throttle_bytes_per_s:
                ahead = sent / self.throttle_bytes_per_s - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)


class _Conn:
    """A client socket with a read buffer (the head is read past, into the body)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    def read_head(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head

    def recv(self, size: int) -> bytes:
        if self.buffer:
            data, self.buffer = self.buffer[:size], self.buffer[size:]
            return data
        return self.sock.recv(size)

    def discard(self, length: int) -> None:
        self.sock.settimeout(5)
        while length > 0:
            data = self.recv(min(65536, length))
            if not data:
                return
            length -= len(data)


def _pipe(source: socket.socket, dest: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            dest.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dest.shutdown(socket.SHUT_WR)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------

# botocore "standard" retries sleep rand(0, 1) * min(scale * 2 ** (k - 1), 20) s after attempt k;
# scale is 1 s for throttling codes (SlowDown) and 0.05 s for everything else (botocore 1.44).
THROTTLING_SCALE_S, OTHER_SCALE_S = 1.0, 0.05
SLACK_S = 3.0  # process, connection and thread scheduling overhead on a busy 2-core machine


def backoff_bound(retries: int, scale: float) -> float:
    """The longest total sleep of ``retries`` retries."""
    return sum(min(scale * 2**k, 20.0) for k in range(retries))


def creds(server: SeaweedS3, endpoint: str | None = None, secret: str | None = None) -> S3Credentials:
    return S3Credentials(endpoint or server.endpoint_url, server.access_key, secret or server.secret_key,
                         region="us-east-1")


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.fixture
def bucket(server: RestartableSeaweed) -> str:
    return server.make_bucket()


@dataclass
class FaultWorker:
    worker: object
    base: Path  # every folder the worker may write to lies under here

    def run(self, job: dict) -> tuple[dict, float]:
        before = files_under(self.base)
        started = time.monotonic()
        result = self.worker.run(job)
        elapsed = time.monotonic() - started
        assert files_under(self.base) == before, "a failed job left files behind"
        return result, elapsed


@pytest.fixture(scope="module")
def fault_worker(tiny_model_dir, tmp_path_factory) -> FaultWorker:
    from audioldm.settings import Settings
    from audioldm.worker import Worker

    base = tmp_path_factory.mktemp("fault-worker")
    for name in ("roots", "work", "cache"):
        (base / name).mkdir()
    worker = Worker(Settings(default_model="tiny", local_roots=[base / "roots"], model_search_dirs=[],
                             work_dir=base / "work", checkpoint_cache_dir=base / "cache"))
    worker.warm_up()
    return FaultWorker(worker, base)


def generate_job(server: SeaweedS3, bucket: str, endpoint: str | None = None, **s3_overrides) -> dict:
    config = {**s3_config(server, bucket), **s3_overrides}
    if endpoint:
        config["endpointUrl"] = endpoint
    return {"id": f"gen-{uuid.uuid4().hex[:8]}", "s3Config": config,
            "input": {"task": "generate", "prompt": "rain", "duration_s": 0.5, "steps": 1, "candidates": 1,
                      "output": {"uri": f"s3://{bucket}/out/"}}}


def finetune_job(server: SeaweedS3, bucket: str, dataset_key: str, endpoint: str | None = None) -> dict:
    config = s3_config(server, bucket)
    if endpoint:
        config["endpointUrl"] = endpoint
    return {"id": f"ft-{uuid.uuid4().hex[:8]}", "s3Config": config,
            "input": {"task": "finetune", "dataset": f"s3://{bucket}/{dataset_key}", "max_steps": 2,
                      "batch_size": 2, "output": {"uri": f"s3://{bucket}/runs/r/"}}}


def keys_in(server: SeaweedS3, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in server.client().list_objects_v2(Bucket=bucket).get("Contents", []))


# ---------------------------------------------------------------------------------------------
# the server down when a job starts
# ---------------------------------------------------------------------------------------------


def test_server_down_at_job_start_fails_fast_and_writes_nothing(server, bucket, fault_worker, tmp_path):
    server.client().upload_file(str(tone_dataset_zip(tmp_path / "tones.zip")), bucket, "datasets/tones.zip")
    server.kill()
    try:
        generated, gen_s = fault_worker.run(generate_job(server, bucket))
        tuned, ft_s = fault_worker.run(finetune_job(server, bucket, "datasets/tones.zip"))
    finally:
        restart_s = server.restart()
    for result in (generated, tuned):
        assert result == {"error": f"cannot reach storage endpoint {server.endpoint_url}"}, result
    # 5 attempts (the worker's default), each refused at once, with <= 0.75 s of backoff in all.
    bound = backoff_bound(4, OTHER_SCALE_S) + SLACK_S
    assert gen_s < bound and ft_s < bound, (gen_s, ft_s, bound)
    assert keys_in(server, bucket) == ["datasets/tones.zip"]  # nothing written once it is back
    print(f"server down: generate failed in {gen_s:.2f}s, finetune in {ft_s:.2f}s (bound {bound:.2f}s); "
          f"restart took {restart_s:.2f}s")


# ---------------------------------------------------------------------------------------------
# the server killed in the middle of a multipart upload
# ---------------------------------------------------------------------------------------------

PART = 5 * MiB
UPLOAD_BYTES = 4 * PART  # four parts


class Watcher:
    """HEADs and GETs an object directly (not through the proxy) until stopped, and records
    every complete answer: (status, length, sha256 or None)."""

    def __init__(self, server: SeaweedS3, bucket: str, key: str) -> None:
        self.client = server.client(max_attempts=1, connect_timeout=0.3, read_timeout=5)
        self.bucket, self.key = bucket, key
        self.seen: list[tuple[str, int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _watch(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while not self._stop.wait(0.05):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self.key)
                body = self.client.get_object(Bucket=self.bucket, Key=self.key)["Body"].read()
                self.seen.append(("found", head["ContentLength"], hashlib.sha256(body).hexdigest()))
            except ClientError as exc:
                self.seen.append((str(exc.response["Error"]["Code"]), 0, None))
            except BotoCoreError:
                pass  # server down: no answer is not an answer


# 10 attempts keep retrying for seconds (backoff up to 0.05 * 2**8 s), well past a ~1 s restart;
# 3 attempts give up within ~0.15 s of backoff, long before it.
@pytest.mark.parametrize(("back_within_retries", "max_attempts"), [(True, 10), (False, 3)],
                         ids=["restarted-within-retries", "still-down-after-retries"])
def test_server_killed_mid_multipart_upload(server, bucket, tmp_path, back_within_retries, max_attempts):
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(UPLOAD_BYTES))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    key = "uploads/big.bin"
    with FaultProxy(server.endpoint_url, throttle_bytes_per_s=8 * MiB) as proxy:
        storage = Storage(creds(server, proxy.endpoint_url), max_attempts=max_attempts, connect_timeout=1,
                          read_timeout=5, multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=1)
        outcome: dict[str, object] = {}

        def upload() -> None:
            started = time.monotonic()
            try:
                storage.put_file(source, f"s3://{bucket}/{key}")
                outcome["ok"] = True
            except StorageError as exc:
                outcome["error"] = str(exc)
            outcome["seconds"] = time.monotonic() - started

        with Watcher(server, bucket, key) as watcher:
            thread = threading.Thread(target=upload)
            thread.start()
            deadline = time.monotonic() + 30
            while proxy.body_bytes < int(1.5 * PART):  # in the middle of part 2
                assert time.monotonic() < deadline and thread.is_alive(), outcome
                time.sleep(0.01)
            server.kill()
            if back_within_retries:
                server.restart()
                thread.join(timeout=120)
            else:
                thread.join(timeout=120)
                server.restart()
            assert not thread.is_alive()
            time.sleep(0.3)  # a last look once everything settled
        uploads = server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])

    part_puts = [r for r in proxy.requests if r.startswith("PUT ") and "partNumber=" in r]
    # Nobody ever saw a truncated object: only "not there" or the whole, correct object.
    assert watcher.seen, "the watcher never got an answer"
    for status, length, sha in watcher.seen:
        assert (status, length, sha) == ("found", UPLOAD_BYTES, digest) or status in ("404", "NoSuchKey"), \
            (status, length)
    head = None
    try:
        head = server.client().head_object(Bucket=bucket, Key=key)
    except Exception:  # noqa: BLE001 - absent is the other acceptable end state
        pass
    if outcome.get("ok"):
        assert head is not None and head["ContentLength"] == UPLOAD_BYTES
        data = server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        assert hashlib.sha256(data).hexdigest() == digest
    else:
        error = outcome["error"]
        assert head is None, "a failed upload left an object behind"
        assert re.search(r"(stopped responding during upload|cannot reach storage endpoint)", error), error
        assert "Traceback" not in error and server.secret_key not in error and server.access_key not in error
    if back_within_retries:
        assert outcome.get("ok"), f"the server came back within the retry window but: {outcome}"
    print(f"killed mid-part 2 ({'restarted at once' if back_within_retries else 'restarted after the failure'}): "
          f"{'completed' if outcome.get('ok') else 'failed: ' + outcome['error']} in {outcome['seconds']:.2f}s; "
          f"{len(part_puts)} part PUTs for 4 parts; {len(watcher.seen)} reads, none truncated; "
          f"{len(uploads)} unfinished multipart upload(s) left on the server")


def test_connection_cut_mid_part_is_retried(server, bucket, tmp_path):
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(3 * PART))
    # Requests: 0 create-multipart, 1 part 1, 2 part 2 -> cut after 1 MiB of its body.
    with FaultProxy(server.endpoint_url, plan=["pass", "pass", f"cut:{MiB}"]) as proxy:
        storage = Storage(creds(server, proxy.endpoint_url), max_attempts=3, connect_timeout=1, read_timeout=5,
                          multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=1)
        storage.put_file(source, f"s3://{bucket}/cut.bin")
    part_numbers = [re.search(r"partNumber=(\d+)", r).group(1) for r in proxy.requests if "partNumber=" in r]
    assert part_numbers == ["1", "2", "2", "3"], proxy.requests
    data = server.client().get_object(Bucket=bucket, Key="cut.bin")["Body"].read()
    assert data == source.read_bytes()


# ---------------------------------------------------------------------------------------------
# permanent errors: clear, and never retried
# ---------------------------------------------------------------------------------------------


def test_wrong_keys_missing_bucket_and_missing_object_fail_clearly_after_one_request(
        server, bucket, fault_worker, tmp_path):
    with FaultProxy(server.endpoint_url) as proxy:
        endpoint = proxy.endpoint_url
        wrong, wrong_s = fault_worker.run(generate_job(server, bucket, endpoint, accessSecret="not-the-secret-" + "x" * 20))
        injected("wrong keys")
        requests_wrong = list(proxy.requests)

        missing = f"missing-{uuid.uuid4().hex[:12]}"
        proxy.requests.clear()
        no_bucket, no_bucket_s = fault_worker.run(generate_job(server, missing, endpoint))
        injected("missing bucket")
        requests_no_bucket = list(proxy.requests)

        proxy.requests.clear()
        no_object, no_object_s = fault_worker.run(finetune_job(server, bucket, "datasets/nope.zip", endpoint))
        injected("missing object")
        requests_no_object = list(proxy.requests)

    assert wrong["error"].startswith(f"storage rejected the credentials for bucket '{bucket}' at {endpoint}"), wrong
    assert no_bucket == {"error": f"bucket '{missing}' does not exist at {endpoint}"}, no_bucket
    assert no_object == {"error": f"object s3://{bucket}/datasets/nope.zip not found"}, no_object
    assert requests_wrong == [f"HEAD /{bucket}"] and requests_no_bucket == [f"HEAD /{missing}"]
    # The fine-tune checks its run directory (HEAD bucket, list checkpoints), then the dataset: each once.
    assert len(requests_no_object) == len(set(requests_no_object)) == 3, requests_no_object
    assert requests_no_object[-1] == f"HEAD /{bucket}/datasets/nope.zip"
    for seconds in (wrong_s, no_bucket_s, no_object_s):
        assert seconds < SLACK_S
    assert keys_in(server, bucket) == []
    print(f"permanent errors: 1 request each for wrong keys ({wrong_s:.2f}s) and a missing bucket "
          f"({no_bucket_s:.2f}s); missing dataset: {len(requests_no_object)} distinct requests ({no_object_s:.2f}s)")


# ---------------------------------------------------------------------------------------------
# slow and failing responses: transient ones retried with backoff, permanent ones reported
# ---------------------------------------------------------------------------------------------

READ_TIMEOUT_S = 0.5


@pytest.mark.parametrize(("plan", "scale", "retries"), [
    (["500", "500"], OTHER_SCALE_S, 2),
    (["503", "503"], THROTTLING_SCALE_S, 2),  # SlowDown: the throttling backoff
    ([f"delay:{4 * READ_TIMEOUT_S}", f"delay:{4 * READ_TIMEOUT_S}"], OTHER_SCALE_S, 2),  # read timeouts
    (["delay:0.3"] * 3, OTHER_SCALE_S, 0),  # slow but within the timeout: no retry at all
], ids=["http-500-twice", "slowdown-503-twice", "read-timeout-twice", "slow-within-timeout"])
def test_transient_faults_are_retried_with_bounded_backoff(server, bucket, plan, scale, retries):
    data = os.urandom(200_000)
    uri = f"s3://{bucket}/t/{uuid.uuid4().hex[:8]}.bin"
    server.client().put_object(Bucket=bucket, Key=uri.split("/", 3)[3], Body=data)
    with FaultProxy(server.endpoint_url, plan=list(plan)) as proxy:
        storage = Storage(creds(server, proxy.endpoint_url), max_attempts=5, connect_timeout=1,
                          read_timeout=READ_TIMEOUT_S)
        started = time.monotonic()
        got = storage.read_bytes(uri, max_bytes=len(data))
        seconds = time.monotonic() - started
    assert got == data
    assert len(proxy.requests) == retries + 1 == proxy.count("GET "), proxy.requests
    waited = sum(float(p.split(":")[1]) for p in plan if p.startswith("delay:") and retries == 0)
    timeouts = READ_TIMEOUT_S * sum(p.startswith("delay:") for p in plan) if retries else 0.0
    bound = backoff_bound(retries, scale) + timeouts + waited + SLACK_S
    assert seconds < bound, (seconds, bound)
    print(f"{plan}: {retries + 1} attempts, {seconds:.2f}s (bound {bound:.2f}s)")


@pytest.mark.parametrize(("plan", "message"), [
    ("500", r"failed to read s3://\S+ \(InternalError, HTTP 500\) after 3 attempts"),
    ("hang", r"stopped responding during read of s3://"),
], ids=["http-500-always", "never-answers"])
def test_permanent_faults_stop_after_max_attempts_within_a_bound(server, bucket, plan, message):
    uri = f"s3://{bucket}/p/{uuid.uuid4().hex[:8]}.json"
    server.client().put_object(Bucket=bucket, Key=uri.split("/", 3)[3], Body=b"{}")
    with FaultProxy(server.endpoint_url, plan=plan) as proxy:
        storage = Storage(creds(server, proxy.endpoint_url), max_attempts=3, connect_timeout=1,
                          read_timeout=READ_TIMEOUT_S)
        started = time.monotonic()
        with pytest.raises(StorageError, match=message) as info:
            storage.read_bytes(uri, max_bytes=100)
        seconds = time.monotonic() - started
    assert len(proxy.requests) == 3, proxy.requests
    bound = backoff_bound(2, OTHER_SCALE_S) + (3 * READ_TIMEOUT_S if plan == "hang" else 0) + SLACK_S
    assert seconds < bound, (seconds, bound)
    assert server.secret_key not in str(info.value) and server.access_key not in str(info.value)
    print(f"permanent {plan}: 3 attempts in {seconds:.2f}s (bound {bound:.2f}s): {info.value}")


def test_job_rides_out_transient_errors(server, bucket, fault_worker):
    # The worker's own storage settings (5 attempts): its first two requests fail with 503 and
    # one upload is answered slowly; the job still lands its audio.
    with FaultProxy(server.endpoint_url, plan=["503", "503", "pass", "delay:0.5"]) as proxy:
        result, seconds = fault_worker.run(generate_job(server, bucket, proxy.endpoint_url))
    assert "error" not in result, result
    [entry] = result["outputs"]
    assert proxy.requests[:3] == [f"HEAD /{bucket}"] * 3 and proxy.count("PUT ") == 1, proxy.requests
    key = entry["uri"].removeprefix(f"s3://{bucket}/")
    assert server.client().head_object(Bucket=bucket, Key=key)["ContentLength"] == entry["bytes"]
    print(f"job through 2 x 503 and a slow upload: done in {seconds:.2f}s, {len(proxy.requests)} requests")


def test_zz_report_faults_injected(capsys):
    with capsys.disabled():
        print(f"\nstorage faults injected: {sum(FAULTS.values())} ({FAULTS})")
