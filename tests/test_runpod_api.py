"""End to end through the RunPod SDK's own local API server, as a user would run it.

One real ``python handler.py --rp_serve_api`` process (tiny model, CPU; shared by the session), real HTTP,
real SeaweedFS storage; nothing is mocked.

What runpod 1.12.0's local API does (read in runpod/serverless/modules/rp_fastapi.py, and checked here):
- Request bodies are ``{"input": ..., "webhook": ...}``; every other top-level field is dropped,
  ``s3Config`` included, so per-request credentials cannot be tested through it (the worker falls
  back to the BUCKET_* env; see test_local_api_drops_s3config).
- Job ids are ``test-<uuid4>``. ``/run`` only stores the job and answers IN_PROGRESS; the job runs
  inside the first ``/status/{id}`` call, which answers COMPLETED or FAILED and forgets the job (a
  second ``/status`` says "Job ID not found"). Two concurrent ``/status`` calls for one job would run
  it twice, so this file never polls in parallel.
- Success: ``{"id", "status": "COMPLETED", "output": <handler result>}``; a handler's returned
  ``{"error": msg}``: ``{"id", "status": "FAILED", "error": msg}`` with no ``output``. HTTP 200 both ways.
- Webhook: on success only, a POST of ``{"output": <handler result>}`` (no id, no status).
- ``--rp_api_host`` (default "localhost") picks the bind address; we pass 127.0.0.1.
- No /health and no /cancel routes; ``GET /openapi.json`` answers once uvicorn is up, and the
  worker loads its model before starting uvicorn, so that is also "model warm".
"""

from __future__ import annotations

import io
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf

from api_server import HTTP as _HTTP
from api_server import HTTP_TIMEOUT_S, ApiServer
from s3server import SeaweedS3

PROMPT = "rain on a tin roof"

# The ``api`` fixture (one local API server for the session) lives in conftest.py / api_server.py.


@pytest.fixture(scope="module")
def bucket(s3: SeaweedS3) -> str:
    return s3.make_bucket()


# ---------------------------------------------------------------------------------------------
# Webhook receiver
# ---------------------------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    content_type: str
    body: Any


@pytest.fixture
def webhook() -> Iterator[tuple[str, queue.Queue[Received]]]:
    """A stdlib HTTP server on 127.0.0.1 that records every POST: (url, queue of Received)."""
    received: queue.Queue[Received] = queue.Queue()

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw
            received.put(Received(self.path, self.headers.get("Content-Type", ""), body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/hook", received
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _job(bucket: str, prompt: str | list[str] = PROMPT, **overrides: Any) -> dict[str, Any]:
    job = {"task": "generate", "prompt": prompt, "duration_s": 1.0, "steps": 4, "candidates": 2,
           "output": {"uri": f"s3://{bucket}/runs/"}}
    job.update(overrides)
    return job


def _run_and_poll(api: ApiServer, body: dict) -> tuple[dict, dict]:
    """/run, then /status until the job is done (sequentially: see the module docstring)."""
    submitted = api.post("/run", body)
    assert set(submitted) == {"id", "status"}, submitted
    assert submitted["status"] in ("IN_QUEUE", "IN_PROGRESS"), submitted
    deadline = time.monotonic() + HTTP_TIMEOUT_S
    while True:
        status = api.post(f"/status/{submitted['id']}")
        assert status["id"] == submitted["id"], status
        if status["status"] not in ("IN_QUEUE", "IN_PROGRESS"):
            return submitted, status
        assert time.monotonic() < deadline, f"job still {status['status']} after {HTTP_TIMEOUT_S:.0f}s"
        time.sleep(0.2)


def _submit(api: ApiServer, route: str, body: dict) -> dict:
    if route == "runsync":
        return api.post("/runsync", body)
    return _run_and_poll(api, body)[1]


def _completed_output(response: dict, api: ApiServer) -> dict:
    assert response.get("status") == "COMPLETED", (
        f"expected COMPLETED, got {json.dumps(response)[:2000]}\nserver log tail:\n{api.log_tail()}")
    assert "error" not in response, response
    return response["output"]


def _check_outputs(s3: SeaweedS3, bucket: str, job_id: str, result: dict, prompts: list[str]) -> list[str]:
    """Every output is a 1.0 s 16 kHz wav in the bucket under runs/<job id>/, and its presigned
    URL serves the same bytes. Returns the object keys."""
    assert result["task"] == "generate"
    outputs = result["outputs"]
    assert [o["index"] for o in outputs] == list(range(len(prompts)))
    assert [o["prompt"] for o in outputs] == prompts
    client = s3.client()
    keys = []
    for entry in outputs:
        assert "audio_base64" not in entry, "stored outputs must not also come back inline"
        prefix = f"s3://{bucket}/runs/{job_id}/"
        assert entry["uri"].startswith(prefix) and entry["uri"].endswith(".wav"), entry["uri"]
        key = entry["uri"][len(f"s3://{bucket}/"):]
        stored = client.get_object(Bucket=bucket, Key=key)
        data = stored["Body"].read()
        assert stored["ContentType"] == "audio/wav"
        assert len(data) == entry["bytes"]

        audio, rate = sf.read(io.BytesIO(data), dtype="float32")
        info = sf.info(io.BytesIO(data))
        assert (info.format, info.subtype, info.channels) == ("WAV", "PCM_16", 1)
        assert rate == entry["sample_rate"] == 16_000
        assert len(audio) == 16_000, f"{len(audio)} samples, expected exactly 1.0 s"
        assert entry["duration_s"] == 1.0

        # The presigned URL works for anyone with the URL: plain urllib, no credentials.
        assert entry["url"].startswith(s3.endpoint_url + "/"), entry["url"]
        with _HTTP.open(entry["url"], timeout=30) as response:
            assert response.read() == data
        keys.append(key)
    assert len(set(keys)) == len(keys), keys
    return keys


def _objects(s3: SeaweedS3, bucket: str) -> list[str]:
    listing = s3.client().list_objects_v2(Bucket=bucket)
    return [item["Key"] for item in listing.get("Contents", [])]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_runsync_stores_a_wav_in_the_bucket(api: ApiServer, s3: SeaweedS3, bucket: str) -> None:
    response = api.post("/runsync", {"input": _job(bucket)})
    result = _completed_output(response, api)
    assert set(response) == {"id", "status", "output"}
    assert response["id"].startswith("test-")  # the local API's job ids
    keys = _check_outputs(s3, bucket, response["id"], result, [PROMPT])
    assert len(keys) == 1
    assert result["model"]["name"] == "tiny"
    assert result["settings"]["steps"] == 4 and result["settings"]["candidates"] == 2


def test_run_then_status_with_two_prompts(api: ApiServer, s3: SeaweedS3, bucket: str) -> None:
    prompts = [PROMPT, "a dog barking in the distance"]
    submitted, status = _run_and_poll(api, {"input": _job(bucket, prompts)})
    result = _completed_output(status, api)
    keys = _check_outputs(s3, bucket, submitted["id"], result, prompts)
    assert len(keys) == 2
    # The local API forgets a job once /status has reported it.
    gone = api.post(f"/status/{submitted['id']}")
    assert gone["status"] == "FAILED" and "not found" in gone["error"].lower(), gone


def test_webhook_gets_the_result(api: ApiServer, s3: SeaweedS3, bucket: str, webhook) -> None:
    url, received = webhook
    submitted, status = _run_and_poll(api, {"input": _job(bucket), "webhook": url})
    result = _completed_output(status, api)
    try:
        hook = received.get(timeout=30)  # sent from a thread after /status answers
    except queue.Empty:
        pytest.fail(f"no webhook POST within 30 s\nserver log tail:\n{api.log_tail()}")
    assert hook.path == "/hook"
    assert hook.content_type.startswith("application/json")
    # The local API posts only {"output": <result>}, and only for successful jobs. The platform
    # posts the /status-like body instead ({"id", "status": "COMPLETED", "output", "delayTime",
    # "executionTime", ...}), for failures too, and retries; a receiver should read body["output"],
    # which both have, and not rely on id/status being present in local tests.
    assert isinstance(hook.body, dict) and set(hook.body) == {"output"}, hook.body
    assert hook.body["output"] == result
    uri = hook.body["output"]["outputs"][0]["uri"]
    assert uri.startswith(f"s3://{bucket}/runs/{submitted['id']}/")
    assert s3.client().head_object(Bucket=bucket, Key=uri[len(f"s3://{bucket}/"):])["ContentLength"] > 0
    assert received.empty(), "the local API posts the webhook once"


@pytest.mark.parametrize("route", ["runsync", "run"])
def test_invalid_job_fails_with_field_errors_and_writes_nothing(
        api: ApiServer, s3: SeaweedS3, route: str) -> None:
    empty_bucket = s3.make_bucket()
    response = _submit(api, route, {"input": _job(empty_bucket, [], steps=0)})
    assert response["status"] == "FAILED", response
    assert "output" not in response, response
    error = response["error"]
    assert isinstance(error, str)
    assert "input.prompt" in error and "input.steps" in error, error
    assert "Traceback" not in error and "error_traceback" not in error, error
    assert _objects(s3, empty_bucket) == []


@pytest.mark.parametrize("route", ["runsync", "run"])
def test_missing_bucket_fails_clearly(api: ApiServer, s3: SeaweedS3, route: str) -> None:
    missing = f"missing-{uuid.uuid4().hex[:12]}"
    response = _submit(api, route, {"input": _job(missing)})
    assert response["status"] == "FAILED", response
    assert "output" not in response, response
    error = response["error"]
    assert missing in error and "does not exist" in error, error
    assert "Traceback" not in error and "error_traceback" not in error, error
    assert s3.secret_key not in error and s3.access_key not in error
    assert missing not in [b["Name"] for b in s3.client().list_buckets()["Buckets"]]


def test_model_stays_warm_between_jobs(api: ApiServer, s3: SeaweedS3, bucket: str) -> None:
    first = _completed_output(api.post("/runsync", {"input": _job(bucket, seed=1)}), api)
    second = _completed_output(api.post("/runsync", {"input": _job(bucket, seed=2)}), api)
    # handler.py loads the default model before the API starts, so no job pays for it.
    for result in (first, second):
        assert result["model"] == {"name": "tiny", "loaded_this_job": False}, result["model"]
        assert result["timings"]["load_s"] == 0, result["timings"]


def test_local_api_drops_s3config(api: ApiServer, s3: SeaweedS3, bucket: str) -> None:
    """The local API keeps only input/webhook, so a request's s3Config never reaches the handler:
    with a wrong secret the job still succeeds on the worker's BUCKET_* env keys. (On the platform
    the same request would fail with "storage rejected the credentials"; that path is covered
    in-process.) If this starts failing, the SDK forwards s3Config now: test it here instead."""
    bad = {"accessId": s3.access_key, "accessSecret": "not-the-secret-" + uuid.uuid4().hex,
           "bucketName": bucket, "endpointUrl": s3.endpoint_url}
    response = api.post("/runsync", {"input": _job(bucket), "s3Config": bad})
    result = _completed_output(response, api)
    _check_outputs(s3, bucket, response["id"], result, [PROMPT])


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux /proc/net/tcp")
def test_api_listens_on_loopback_only(api: ApiServer) -> None:
    port_hex = f"{api.port:04X}"
    listening: list[str] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].rsplit(":", 1)
            if port == port_hex and fields[3] == "0A":  # 0A = LISTEN
                listening.append(address)
    assert listening == ["0100007F"], f"listeners on port {api.port}: {listening} (0100007F = 127.0.0.1)"


def test_server_log_never_shows_the_secret(api: ApiServer, s3: SeaweedS3) -> None:
    # Runs last: by now the log holds successes, failures and a webhook. (The access key id does
    # appear: it is part of every presigned URL, which the SDK logs at its default DEBUG level.)
    log = api.log_text()
    assert "Started." in log, api.log_tail()
    assert s3.secret_key not in log
