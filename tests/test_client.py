"""audioldm.client end to end: the real local API server (tiny model, CPU), real SeaweedFS.

Nothing of ours is mocked. Transient failures come from a small stdlib HTTP front that answers
503/429 a given number of times and otherwise forwards to the real API; it also records what the
client sent, which is how these tests count the jobs a rerun submits (none) and check the key.

Against the local API the client runs with --concurrency 1: that server runs overlapping /status
calls' jobs at the same time in one process, and the worker's shared pipeline mixes them up (seen:
a 40-step and a 3-step job swapped their run times). What the local API cannot show (jobs that
stay queued, a client interrupted mid-batch, live progress, a working /cancel) is tested against
``FakePlatform``, a stand-in for api.runpod.ai that keeps jobs the way the platform does.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from api_server import REPO, ApiServer
from helpers import decode_audio, list_keys, read_object
from s3server import SeaweedS3

from audioldm import client

CLIENT_TIMEOUT_S = 180
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def bucket(s3: SeaweedS3) -> str:
    return s3.make_bucket()


@pytest.fixture(autouse=True)
def _loopback_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process client runs: no proxy for loopback, and no key or endpoint from the developer's shell.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv(client.API_KEY_ENV, raising=False)
    monkeypatch.delenv("RUNPOD_ENDPOINT_ID", raising=False)


def _job(bucket: str, seed: int, **overrides: Any) -> dict[str, Any]:
    job = {"prompt": f"rain on a tin roof, take {seed}", "seed": seed, "duration_s": 1.0, "steps": 2,
           "candidates": 1, "output": {"uri": f"s3://{bucket}/batch/"}}
    job.update(overrides)
    return job


def _write_jsonl(path: Path, jobs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def _manifest(path: Path) -> dict[int, dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    by_line = {record["line"]: record for record in records}
    assert len(by_line) == len(records), "a compacted manifest has one record per line"
    return by_line


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m audioldm.client ...` as a user runs it."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    full_env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **(env or {}))
    return subprocess.run([sys.executable, "-m", "audioldm.client", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The same CLI in this process (faster): exit code, stdout, stderr."""
    code = client.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _summary(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# A front for the API that fails on purpose and records what it saw
# ---------------------------------------------------------------------------------------------


@dataclass
class Front:
    upstream: str
    failures: list[int] = field(default_factory=list)  # statuses to answer before forwarding
    always: int | None = None  # answer this to everything
    seen: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, status answered)
    run_bodies: list[dict[str, Any]] = field(default_factory=list)
    auth: set[str] = field(default_factory=set)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def next_failure(self) -> int | None:
        with self._lock:
            if self.always is not None:
                return self.always
            return self.failures.pop(0) if self.failures else None

    def record(self, method: str, path: str, status: int, auth: str | None, body: bytes) -> None:
        with self._lock:
            self.seen.append((method, path, status))
            if auth:
                self.auth.add(auth)
            if path == "/run":
                self.run_bodies.append(json.loads(body))

    def requests(self, method: str, prefix: str) -> list[tuple[str, str, int]]:
        return [s for s in self.seen if s[0] == method and s[1].startswith(prefix)]


@pytest.fixture
def front(api: ApiServer) -> Iterator[Front]:
    state = Front(api.base_url)

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            failure = state.next_failure()
            if failure is not None:
                self._reply(failure, b'{"error": "try again"}', {"Retry-After": "0"})
                state.record(self.command, self.path, failure, self.headers.get("Authorization"), body)
                return
            request = urllib.request.Request(state.upstream + self.path, data=body or None, method=self.command,
                                             headers={"Content-Type": "application/json"})
            try:
                with _NO_PROXY.open(request, timeout=CLIENT_TIMEOUT_S) as response:
                    status, data = response.status, response.read()
            except urllib.error.HTTPError as exc:
                status, data = exc.code, exc.read()
            state.record(self.command, self.path, status, self.headers.get("Authorization"), body)
            self._reply(status, data, {})

        def _reply(self, status: int, data: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _handle  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_jsonl_batch_then_rerun_submits_nothing(api: ApiServer, s3: SeaweedS3, front: Front,
                                                 tmp_path: Path) -> None:
    bucket = s3.make_bucket()  # its own: the test counts every object in it
    jobs = [_job(bucket, seed) for seed in range(5)]
    jobs[2]["steps"] = 0  # line 3: invalid per the contract
    path = _write_jsonl(tmp_path / "prompts.jsonl", jobs)

    first = _cli("submit", str(path), "--base-url", api.base_url, "--concurrency", "1", "--poll-interval", "0.1")
    assert first.returncode == 1, first.stderr  # one line failed
    summary = _summary(first.stdout)
    assert summary | {"manifest": None} == {
        "total": 5, "skipped": 0, "submitted": 4, "resumed": 0, "completed": 4, "failed": 0, "invalid": 1,
        "unfinished": 0, "retries": 0, "manifest": None}, first.stderr
    assert "line 3:" in first.stderr and "input.steps" in first.stderr, first.stderr

    manifest_path = tmp_path / "prompts.jsonl.results.jsonl"
    assert summary["manifest"] == str(manifest_path)
    records = _manifest(manifest_path)
    assert sorted(records) == [1, 2, 3, 4, 5]
    bad = records[3]
    assert bad["status"] == "INVALID" and bad.get("job_id") is None
    assert "input.steps" in bad["error"] and "greater than or equal to 1" in bad["error"], bad
    wavs = []
    for number in (1, 2, 4, 5):
        record = records[number]
        assert record["status"] == "COMPLETED" and record["error"] is None, record
        assert record["input"]["seed"] == number - 1
        [uri] = record["uris"]
        assert uri.startswith(f"s3://{bucket}/batch/{record['job_id']}/") and uri.endswith(".wav"), uri
        wavs.append(uri)
    audio, rate = decode_audio(read_object(s3, wavs[0]))
    assert (len(audio), rate) == (16_000, 16_000)
    keys = list_keys(s3, bucket)
    assert sorted(f"s3://{bucket}/{key}" for key in keys) == sorted(wavs)

    # Rerun through the recording front: nothing reaches /run, the bucket does not change.
    again = _cli("submit", str(path), "--base-url", front.url, "--concurrency", "1", "--poll-interval", "0.1")
    assert again.returncode == 1, again.stderr  # line 3 is still invalid
    summary = _summary(again.stdout)
    assert (summary["submitted"], summary["skipped"], summary["invalid"], summary["completed"]) == (0, 4, 1, 0)
    assert front.seen == [], front.seen
    assert list_keys(s3, bucket) == keys
    assert _manifest(manifest_path)[1] == records[1]


def test_csv_with_a_bad_value(api: ApiServer, s3: SeaweedS3, bucket: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "jobs.csv"
    path.write_text(
        "prompt,seed,duration_s,steps,candidates,output.uri\n"
        f'"waves, then gulls",7,1.0,2,1,s3://{bucket}/csv/\n'
        f"a kettle whistling,abc,1.0,2,1,s3://{bucket}/csv/\n"
        f"a door creaking,9,1,3,1,s3://{bucket}/csv/\n")
    results = tmp_path / "out" / "manifest.jsonl"
    results.parent.mkdir()
    code, out, err = _run(capsys, "submit", str(path), "--base-url", api.base_url, "--results", str(results),
                          "--concurrency", "1", "--poll-interval", "0.1", "--progress")
    assert code == 1, err
    assert "line 3:" in err and "input.seed" in err, err
    assert "done=2 failed=0 running=0" in err, err  # the progress bar, forced on without a terminal
    summary = _summary(out)
    assert (summary["submitted"], summary["completed"], summary["invalid"]) == (2, 2, 1), summary

    records = _manifest(results)
    assert records[3]["status"] == "INVALID" and "input.seed" in records[3]["error"]
    assert "valid integer" in records[3]["error"], records[3]
    for number, seed, steps in ((2, 7, 2), (4, 9, 3)):
        record = records[number]
        assert record["status"] == "COMPLETED", record
        # CSV strings converted by the contract's types before sending.
        assert record["input"]["seed"] == seed and record["input"]["steps"] == steps
        assert record["input"]["duration_s"] == 1.0 and record["input"]["task"] == "generate"
        assert record["uris"][0].startswith(f"s3://{bucket}/csv/{record['job_id']}/")
    assert records[2]["input"]["prompt"] == "waves, then gulls"


def test_transient_failures_are_retried(api: ApiServer, bucket: str, front: Front, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    key = "rpa_" + secrets.token_hex(16)
    monkeypatch.setenv(client.API_KEY_ENV, key)
    front.failures = [503, 429, 502]
    path = _write_jsonl(tmp_path / "jobs.jsonl", [_job(bucket, 20), _job(bucket, 21)])
    policy = {"executionTimeout": 120_000, "ttl": 600_000}
    code, out, err = _run(capsys, "submit", str(path), "--base-url", front.url, "--concurrency", "1",
                          "--backoff", "0.01", "--retries", "3", "--poll-interval", "0.1",
                          "--policy", json.dumps(policy), "--webhook", "http://127.0.0.1:9/hook")
    assert code == 0, err
    summary = _summary(out)
    assert (summary["completed"], summary["failed"], summary["retries"]) == (2, 0, 3), summary
    assert [status for _, _, status in front.seen[:3]] == [503, 429, 502]
    assert len(front.requests("POST", "/run")) == 2 + 3  # each failure retried once, both jobs submitted
    # /status: GET as the platform documents; the local API answers 405 and gets POST from then on.
    assert front.requests("GET", "/status/")[0][2] == 405
    assert len(front.requests("GET", "/status/")) == 1
    assert front.auth == {f"Bearer {key}"}
    assert all(body["policy"] == policy and body["webhook"] == "http://127.0.0.1:9/hook"
               for body in front.run_bodies), front.run_bodies
    manifest_text = (tmp_path / "jobs.jsonl.results.jsonl").read_text()
    assert key not in out + err + manifest_text


def test_retries_are_bounded(front: Front, bucket: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    front.always = 503
    path = _write_jsonl(tmp_path / "jobs.jsonl", [_job(bucket, seed) for seed in (30, 31, 32)])
    code, out, err = _run(capsys, "submit", str(path), "--base-url", front.url, "--concurrency", "1",
                          "--backoff", "0.01", "--retries", "2")
    assert code == 1
    assert "gave up after 3 attempts" in err and "HTTP 503" in err, err
    assert "API unavailable, submitting no more jobs" in err, err
    assert len(front.seen) == 3, front.seen  # 1 try + 2 retries, then no other job is tried
    summary = _summary(out)
    assert (summary["failed"], summary["unfinished"], summary["submitted"]) == (1, 2, 0), summary
    records = _manifest(tmp_path / "jobs.jsonl.results.jsonl")
    assert list(records) == [1], "unfinished lines stay out of the manifest; a rerun submits them"
    assert records[1]["status"] == "CLIENT_ERROR" and "HTTP 503" in records[1]["error"]


def test_status_wait_and_cancel(api: ApiServer, bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    job = {"task": "generate", **_job(bucket, 40)}
    first = api.post("/run", {"input": job})["id"]
    code, out, err = _run(capsys, "status", first, "--base-url", api.base_url)
    assert code == 0, err
    status = json.loads(out)
    assert status["id"] == first and status["status"] == "COMPLETED", status  # the local API ran it
    assert status["output"]["outputs"][0]["uri"].startswith(f"s3://{bucket}/batch/{first}/")

    second = api.post("/run", {"input": job})["id"]
    code, out, err = _run(capsys, "wait", second, "--base-url", api.base_url, "--poll-interval", "0.1")
    assert code == 0, err
    assert json.loads(out)["status"] == "COMPLETED"

    # The local API forgot it: a terminal FAILED, so wait ends at once with a non-zero code.
    code, out, err = _run(capsys, "wait", second, "--base-url", api.base_url)
    assert code == 1 and json.loads(out)["error"] == "Job ID not found"

    code, out, err = _run(capsys, "cancel", second, "--base-url", api.base_url)
    assert code == 1 and out == ""
    assert "cancel is not supported by this API" in err and "HTTP 404" in err, err


def test_unreachable_api_gives_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from api_server import free_port

    path = _write_jsonl(tmp_path / "jobs.jsonl", [{"prompt": "x", "steps": 2}, "not an object", {"prompt": ""}])
    path.write_text(path.read_text() + "{broken\n")
    code, out, err = _run(capsys, "submit", str(path), "--base-url", f"http://127.0.0.1:{free_port()}",
                          "--retries", "1", "--backoff", "0.01")
    assert code == 1
    assert "gave up after 2 attempts; last: connection failed" in err, err
    assert "line 2: expected a JSON object, got str" in err
    assert "line 3: invalid job (1 problem):\ninput.prompt: prompt is empty" in err, err
    assert "line 4: invalid JSON: Expecting property name enclosed in double quotes (column 2)" in err, err
    summary = _summary(out)
    assert (summary["invalid"], summary["failed"], summary["retries"]) == (3, 1, 1), summary


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_jsonl(tmp_path / "jobs.jsonl", [{"prompt": "x"}])
    code, _, err = _run(capsys, "submit", str(path), "--endpoint", "abc123")
    assert code == 2 and "set $RUNPOD_API_KEY" in err, err
    code, _, err = _run(capsys, "status", "some-id")
    assert code == 2 and "--endpoint" in err, err
    code, _, err = _run(capsys, "submit", str(path), "--base-url", "http://127.0.0.1:9", "--policy", "[1]")
    assert code == 2 and "--policy must be a JSON object" in err, err


# ---------------------------------------------------------------------------------------------
# Against a stand-in for the platform: queued jobs, interruption, progress, cancel
# ---------------------------------------------------------------------------------------------


@dataclass
class FakePlatform:
    """Keeps jobs as api.runpod.ai does: IN_PROGRESS with the worker's progress as ``output``,
    COMPLETED after ``polls_to_finish`` polls (never while it is None), known until the end."""

    polls_to_finish: int | None = None
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: int = 0
    max_in_flight: int = 0
    auth: set[str] = field(default_factory=set)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def in_flight(self) -> int:
        return sum(1 for job in self.jobs.values() if job["status"] not in client.TERMINAL)

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            job_id = str(uuid.uuid4())
            self.jobs[job_id] = {"input": body["input"], "polls": 0, "status": "IN_QUEUE"}
            self.runs += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight())
            return {"id": job_id, "status": "IN_QUEUE"}

    def status(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            if job["status"] in client.TERMINAL:
                return {"id": job_id, "status": job["status"], **job.get("result", {})}
            job["polls"] += 1
            if self.polls_to_finish is not None and job["polls"] >= self.polls_to_finish:
                job["status"] = "COMPLETED"
                job["result"] = {"output": {"outputs": [{"uri": f"s3://fake/{job_id}/0.wav"}]},
                                 "delayTime": 5, "executionTime": 70}
                return {"id": job_id, "status": "COMPLETED", **job["result"]}
            job["status"] = "IN_PROGRESS"
            return {"id": job_id, "status": "IN_PROGRESS", "output": {"stage": "training", "step": job["polls"]}}

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            if job_id not in self.jobs:
                return None
            self.jobs[job_id]["status"] = "CANCELLED"
            return {"id": job_id, "status": "CANCELLED"}


@pytest.fixture
def platform() -> Iterator[FakePlatform]:
    state = FakePlatform()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            state.auth.add(self.headers.get("Authorization", ""))
            if self.path == "/run":
                self._reply(state.submit(body))
            elif self.path.startswith("/cancel/"):
                self._reply(state.cancel(self.path.removeprefix("/cancel/")))
            else:
                self._reply(None, 405)

        def do_GET(self) -> None:  # noqa: N802
            state.auth.add(self.headers.get("Authorization", ""))
            self._reply(state.status(self.path.removeprefix("/status/")))

        def _reply(self, answer: dict[str, Any] | None, missing: int = 404) -> None:
            data = json.dumps(answer if answer is not None else {"error": "not found"}).encode()
            self.send_response(200 if answer is not None else missing)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _until(condition, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_concurrency_limit_interrupt_and_resume(platform: FakePlatform, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_jsonl(tmp_path / "jobs.jsonl", [{"prompt": f"p{i}", "steps": 2} for i in range(6)])
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")},
           "NO_PROXY": "127.0.0.1,localhost", "RUNPOD_API_KEY": "rpa_test_key"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "audioldm.client", "submit", str(path), "--base-url", platform.url,
         "--concurrency", "2", "--poll-interval", "0.05"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _until(lambda: platform.runs == 2 and all(j["polls"] >= 3 for j in platform.jobs.values()))
        assert platform.runs == 2, "jobs never finish here, so only --concurrency of them may be submitted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "rerun to continue" in err, err
    records = _manifest(tmp_path / "jobs.jsonl.results.jsonl")
    assert sorted(r["job_id"] for r in records.values()) == sorted(platform.jobs)
    assert {r["status"] for r in records.values()} == {"SUBMITTED"}

    # Rerun once the platform finishes jobs: the two submitted jobs are polled, not paid for again.
    platform.polls_to_finish = 2
    monkeypatch.setenv(client.API_KEY_ENV, "rpa_test_key")
    code, out, err = _run(capsys, "submit", str(path), "--base-url", platform.url, "--concurrency", "2",
                          "--poll-interval", "0.01")
    assert code == 0, err
    summary = _summary(out)
    assert (summary["resumed"], summary["submitted"], summary["completed"]) == (2, 4, 6), summary
    assert platform.runs == 6 and platform.max_in_flight == 2
    records = _manifest(tmp_path / "jobs.jsonl.results.jsonl")
    for number, record in records.items():
        assert record["status"] == "COMPLETED" and record["input"]["prompt"] == f"p{number - 1}"
        assert record["uris"] == [f"s3://fake/{record['job_id']}/0.wav"]
        assert (record["delayTime"], record["executionTime"]) == (5, 70)
    assert platform.auth == {"Bearer rpa_test_key"}


def test_wait_shows_progress_and_cancel_works(platform: FakePlatform, capsys: pytest.CaptureFixture[str]) -> None:
    platform.polls_to_finish = 4
    job_id = platform.submit({"input": {"task": "finetune"}})["id"]
    code, out, err = _run(capsys, "wait", job_id, "--base-url", platform.url, "--poll-interval", "0.01")
    assert code == 0, err
    assert json.loads(out)["status"] == "COMPLETED"
    progress = [line for line in err.splitlines() if line.startswith("IN_PROGRESS: ")]
    assert progress == [f'IN_PROGRESS: {{"stage": "training", "step": {step}}}' for step in (1, 2, 3)], err

    platform.polls_to_finish = None
    other = platform.submit({"input": {}})["id"]
    code, out, err = _run(capsys, "cancel", other, "--base-url", platform.url)
    assert code == 0 and json.loads(out) == {"id": other, "status": "CANCELLED"}, err
    code, out, err = _run(capsys, "wait", other, "--base-url", platform.url)
    assert code == 1 and json.loads(out)["status"] == "CANCELLED"
    code, out, err = _run(capsys, "status", "no-such-job", "--base-url", platform.url)
    assert code == 1 and "HTTP 404" in err, err
