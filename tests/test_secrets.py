"""Credentials never leak: not into logs, not into errors, not into results.

Jobs run with the storage keys in the environment (BUCKET_*) and in the request's ``s3Config``:
a generate job writing to S3, a short fine-tune, and failing jobs (wrong secret; the secret
pasted into a wrong field). They run in-process, with every log record captured at DEBUG (the
root logger and the loggers that do not propagate to it, such as Lightning's), and through the
local RunPod API (``handler.py --rp_serve_api``), whose whole stdout/stderr is read.

What holds:
- the secret key (the right one and the wrong one) appears in no log line, no error and no result;
- the access key id appears in no log line and no error. It does appear in results, but only
  inside presigned ``url`` fields: a SigV4 presigned URL carries it by design
  (``X-Amz-Credential=<key id>/<date>/...``), and the URL is what the caller asked for;
- the worker's redaction is installed as ``handler.py`` installs it (``redact.install()``: a
  ``RedactingFilter`` on the log handler). Without the filter (a raw capture) the secret still
  appears nowhere; the key id appears only in botocore's own DEBUG lines (its request headers),
  which the filter masks.
"""

from __future__ import annotations

import logging
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from audioldm import redact
from helpers import s3_config, tone_dataset_zip

WRONG_SECRET = "wrong-secret-" + uuid.uuid4().hex  # sent as a secret too: must not leak either


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bucket(s3, tmp_path_factory) -> str:
    name = s3.make_bucket()
    s3.client().upload_file(str(tone_dataset_zip(tmp_path_factory.mktemp("sec") / "tones.zip", seconds=1.0)),
                            name, "datasets/tones.zip")
    return name


class Capture(logging.Handler):
    """Keeps every formatted record, traceback included."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def logs() -> Iterator[tuple[Capture, Capture]]:
    """(filtered, raw) captures of every log record at DEBUG, on the root logger and on every
    logger that does not propagate to it. The raw capture sees records before the filter does."""
    raw, filtered = Capture(), Capture()
    filtered.addFilter(redact.RedactingFilter())  # what redact.install() puts on handlers
    loggers = [logging.getLogger()] + [logger for logger in logging.root.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger) and not logger.propagate]
    saved = [(logger, logger.level) for logger in loggers]
    for logger in loggers:
        logger.addHandler(raw)  # first: records reach it before the filter rewrites them
        logger.addHandler(filtered)
        logger.setLevel(logging.DEBUG)
    try:
        yield filtered, raw
    finally:
        for logger, level in saved:
            logger.removeHandler(raw)
            logger.removeHandler(filtered)
            logger.setLevel(level)


def strings(value: object, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, text) of every string in a JSON-like result; dict keys end the path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield path + "/" + str(key), str(key)
            yield from strings(item, f"{path}/{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from strings(item, f"{path}/{index}")
    elif isinstance(value, str):
        yield path, value


def check_result(result: dict, s3) -> int:
    """The rules for one result or error; returns how many presigned URLs carry the key id."""
    urls = 0
    for path, text in strings(result):
        assert s3.secret_key not in text and WRONG_SECRET not in text, f"secret in {path}"
        if s3.access_key in text:
            assert path.endswith("/url") and "X-Amz-Credential=" + s3.access_key in text, f"key id in {path}"
            urls += 1
    if "error" in result:
        assert s3.access_key not in result["error"]
    return urls


def check_logs(lines: list[str], s3, where: str) -> None:
    for line in lines:
        for secret in (s3.secret_key, WRONG_SECRET, s3.access_key):
            assert secret not in line, f"{where}: a key in the log: {line[:300]}"


def make_worker(root: Path):
    from audioldm.settings import Settings
    from audioldm.worker import Worker

    (root / "roots").mkdir(parents=True)
    worker = Worker(Settings(default_model="tiny", local_roots=[root / "roots"], model_search_dirs=[],
                             work_dir=root / "work", checkpoint_cache_dir=root / "cache"))
    worker.warm_up()
    return worker


def jobs(bucket: str, with_config: dict | None) -> list[tuple[str, dict, bool]]:
    """(name, job, should succeed) for one way of passing credentials."""
    extra = {"s3Config": with_config} if with_config else {}
    generate = {"task": "generate", "prompt": "rain", "duration_s": 0.5, "steps": 1, "candidates": 1,
                "output": {"uri": f"s3://{bucket}/sec/"}}
    finetune = {"task": "finetune", "dataset": f"s3://{bucket}/datasets/tones.zip", "max_steps": 1,
                "save_every_steps": 1, "batch_size": 2, "validation_steps": 1, "validation_prompts": ["x"],
                "output": {"uri": f"s3://{bucket}/runs/{uuid.uuid4().hex[:8]}/"}}
    return [
        ("generate", {"id": "gen", **extra, "input": generate}, True),
        ("finetune", {"id": "ft", **extra, "input": finetune}, True),
        # A caller pasting the secret where it does not belong: refused without echoing it.
        ("secret in a field", {"id": "typo", **extra, "input": {**generate, "seed": "SECRET"}}, False),
    ]


def test_keys_in_s3config_never_leak(s3, bucket, tmp_path, logs, capsys):
    filtered, raw = logs
    worker = make_worker(tmp_path)
    config = s3_config(s3, bucket)
    urls = 0
    cases = jobs(bucket, config)
    cases[2][1]["input"]["seed"] = s3.secret_key
    wrong = {"id": "wrong", "s3Config": {**config, "accessSecret": WRONG_SECRET}, "input": cases[0][1]["input"]}
    for name, job, ok in [*cases, ("wrong secret", wrong, False)]:
        result = worker.run(job)
        assert ("error" not in result) == ok, (name, result)
        urls += check_result(result, s3)
    assert "rejected the credentials" in result["error"]
    check_logs(filtered.lines, s3, "in-process log")
    raw_text = "\n".join(raw.lines)
    assert s3.secret_key not in raw_text and WRONG_SECRET not in raw_text  # never even handed to logging
    raw_key_id_lines = [line for line in raw.lines if s3.access_key in line]
    assert all(line.startswith("DEBUG botocore") for line in raw_key_id_lines), raw_key_id_lines[:3]
    with capsys.disabled():
        print(f"\ns3Config: {len(cases) + 1} jobs, {len(filtered.lines)} log records, 0 with a key; key id in "
              f"{urls} presigned url(s) only; {len(raw_key_id_lines)} raw botocore DEBUG record(s) with the key "
              "id, all masked by the filter")


def test_keys_in_env_never_leak(s3, bucket, tmp_path, logs, monkeypatch, capsys):
    filtered, _ = logs
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", s3.endpoint_url)
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", s3.secret_key)
    worker = make_worker(tmp_path / "right")  # reads (and registers) the env keys at start, as in production
    cases = jobs(bucket, None)
    cases[2][1]["input"]["seed"] = s3.secret_key
    urls = 0
    for name, job, ok in cases:
        result = worker.run(job)
        assert ("error" not in result) == ok, (name, result)
        urls += check_result(result, s3)
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", WRONG_SECRET)
    wrong_worker = make_worker(tmp_path / "wrong")
    result = wrong_worker.run(cases[0][1])
    assert "rejected the credentials" in result["error"]
    check_result(result, s3)
    check_logs(filtered.lines, s3, "in-process log")
    with capsys.disabled():
        print(f"\nenv keys: {len(cases) + 1} jobs, {len(filtered.lines)} log records, 0 with a key; key id in "
              f"{urls} presigned url(s) only")


def test_local_api_server_output_never_shows_a_key(api, s3, bucket, tiny_model_dir, tmp_path, capsys):
    from api_server import _start, server_env

    responses = []
    for name, job, ok in jobs(bucket, None):  # the local API drops s3Config: its keys come from env
        if name == "secret in a field":
            job["input"]["seed"] = s3.secret_key
        response = api.post("/runsync", {"input": job["input"]})
        assert (response["status"] == "COMPLETED") == ok, (name, response)
        responses.append(response)

    env = server_env(s3, tiny_model_dir, tmp_path)
    env["BUCKET_SECRET_ACCESS_KEY"] = WRONG_SECRET
    wrong = _start(env, tmp_path / "wrong-keys.log")
    try:
        failed = wrong.post("/runsync", {"input": jobs(bucket, None)[0][1]["input"]})
    finally:
        wrong.proc.send_signal(signal.SIGKILL)  # ours, and done with: no need for a graceful stop
        wrong.proc.wait(timeout=30)
    assert failed["status"] == "FAILED" and "rejected the credentials" in failed["error"], failed
    responses.append(failed)

    urls = sum(check_result(response, s3) for response in responses)
    lines = api.log_text().splitlines() + wrong.log_text().splitlines()
    check_logs(lines, s3, "API server output")
    with capsys.disabled():
        print(f"\nlocal API: {len(responses)} requests, {len(lines)} lines of server output, 0 with a key; "
              f"key id in {urls} presigned url(s) only")
