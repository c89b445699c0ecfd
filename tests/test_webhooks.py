"""audioldm.webhooks: the receiver as a user runs it (``python -m audioldm.webhooks``), fed by the
worker's real local API server (tiny model, SeaweedFS) and by hand-made requests."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from api_server import REPO, ApiServer
from s3server import SeaweedS3

from audioldm import client

MAX_BYTES = 64 * 1024
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Receiver:
    url: str
    out: Path
    token: str
    proc: subprocess.Popen

    def files(self) -> list[Path]:
        """Stored completions; the receiver's in-flight temp files start with a dot."""
        return sorted(path for path in self.out.iterdir() if not path.name.startswith("."))

    def post(self, body: bytes, token: str | None = None, content_type: str = "application/json",
             path: str = "/hook") -> tuple[int, dict]:
        query = f"?token={token}" if token is not None else ""
        request = urllib.request.Request(f"{self.url}{path}{query}", data=body, method="POST",
                                         headers={"Content-Type": content_type})
        try:
            with _HTTP.open(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")


def _start_receiver(out: Path) -> Receiver:
    token = secrets.token_urlsafe(16)
    env = {**os.environ, "WEBHOOK_TOKEN": token, "PYTHONUNBUFFERED": "1"}  # the token via env: not in `ps`
    proc = subprocess.Popen(
        [sys.executable, "-m", "audioldm.webhooks", "--port", "0", "--out", str(out),
         "--max-bytes", str(MAX_BYTES)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", first)
    if not match:
        proc.kill()
        pytest.fail(f"receiver did not start: {first}{proc.communicate()[0]}")
    assert token not in first
    return Receiver(match.group(1), out, token, proc)


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    server = _start_receiver(tmp_path_factory.mktemp("completions"))
    try:
        yield server
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=10)


@pytest.fixture
def empty(receiver: Receiver) -> Receiver:
    for path in receiver.files():
        path.unlink()
    return receiver


def _wait_for_file(receiver: Receiver, timeout_s: float = 30) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        files = receiver.files()
        if files:
            return files[0]
        time.sleep(0.05)
    pytest.fail(f"no completion stored within {timeout_s:.0f}s")


def test_local_api_webhook_via_the_client(api: ApiServer, s3: SeaweedS3, empty: Receiver, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    bucket = s3.make_bucket()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a bell", "duration_s": 1.0, "steps": 2, "candidates": 1,
                                "output": {"uri": f"s3://{bucket}/hooked/"}}) + "\n")
    code = client.main(["submit", str(jobs), "--base-url", api.base_url, "--poll-interval", "0.1",
                        "--webhook", f"{empty.url}/hook?token={empty.token}"])
    assert code == 0, capsys.readouterr().err
    job_id = json.loads((tmp_path / "jobs.jsonl.results.jsonl").read_text())["job_id"]

    stored = _wait_for_file(empty)  # the local API posts from a thread after /status answered
    # The local API's body is only {"output": ...}: no id, so the file is named by a uuid.
    assert re.fullmatch(r"no-id-[0-9a-f-]{36}\.json", stored.name), stored.name
    body = json.loads(stored.read_text())
    assert set(body) == {"output"}
    uri = body["output"]["outputs"][0]["uri"]
    assert uri.startswith(f"s3://{bucket}/hooked/{job_id}/") and uri.endswith(".wav"), uri
    assert not [p for p in empty.out.iterdir() if p.name.startswith(".incoming-")]


def test_platform_shaped_completion_is_stored_by_job_id(empty: Receiver) -> None:
    body = {"id": "2f1c-abc_123.x", "status": "COMPLETED", "delayTime": 12, "executionTime": 3400,
            "output": {"outputs": [{"uri": "s3://b/batch/2f1c-abc_123.x/0.wav"}]}}
    for _ in range(2):  # the platform retries; the same job lands in the same file
        status, answer = empty.post(json.dumps(body).encode(), token=empty.token)
        assert (status, answer) == (200, {"stored": "2f1c-abc_123.x.json"})
    assert [p.name for p in empty.files()] == ["2f1c-abc_123.x.json"]
    assert json.loads(empty.files()[0].read_text()) == body

    failed = {"id": "../../etc/passwd", "status": "FAILED", "error": "boom"}
    status, answer = empty.post(json.dumps(failed).encode(), token=empty.token)
    assert status == 200 and answer["stored"].startswith("no-id-"), answer  # unsafe id: not a path
    assert len(empty.files()) == 2


@pytest.mark.parametrize("token", [None, "", "wrong"])
def test_wrong_token_is_refused(empty: Receiver, token: str | None) -> None:
    body = json.dumps({"id": "j1", "status": "COMPLETED", "output": {}}).encode()
    status, answer = empty.post(body, token=token if token != "wrong" else empty.token + "x")
    assert status == 403 and answer == {"error": "missing or wrong token"}
    assert empty.files() == []


@pytest.mark.parametrize("body,content_type,expected", [
    (b'{"output": "' + b"x" * (2 * MAX_BYTES) + b'"}', "application/json", 413),
    (b"output=1", "application/x-www-form-urlencoded", 415),
    (b"{not json", "application/json", 400),
    (b"[1, 2]", "application/json", 400),
    (b'{"hello": "world"}', "application/json", 422),
    (b'{"id": 5, "status": "COMPLETED"}', "application/json", 422),
])
def test_bad_bodies_are_refused(empty: Receiver, body: bytes, content_type: str, expected: int) -> None:
    status, answer = empty.post(body, token=empty.token, content_type=content_type)
    assert status == expected, answer
    assert "error" in answer
    assert empty.files() == []


def test_get_is_not_allowed_and_token_is_not_logged(tmp_path: Path) -> None:
    own = _start_receiver(tmp_path)  # its own process: this test stops it to read its whole log
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            _HTTP.open(f"{own.url}/hook?token={own.token}", timeout=10)
        assert refused.value.code == 405
        assert own.post(b'{"output": 1}', token=own.token)[0] == 200
        assert own.post(b'{"output": 1}', token="nope")[0] == 403
    finally:
        own.proc.send_signal(signal.SIGINT)  # a clean stop, so its output can be read in full
        output, _ = own.proc.communicate(timeout=10)
    assert "stored no-id-" in output  # one line per stored completion...
    assert own.token not in output  # ...and never the token from the URL
