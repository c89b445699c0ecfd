"""Batch client for this worker on RunPod serverless, or on any RunPod-compatible API.

    python -m audioldm.client submit prompts.jsonl --endpoint ENDPOINT_ID
    python -m audioldm.client status JOB_ID --endpoint ENDPOINT_ID
    python -m audioldm.client wait JOB_ID --endpoint ENDPOINT_ID
    python -m audioldm.client cancel JOB_ID --endpoint ENDPOINT_ID

The API key comes from the environment (``RUNPOD_API_KEY``) and is only ever sent as the
``Authorization: Bearer`` header, as the runpod SDK does; it is never printed or stored.

``submit`` reads one job ``input`` per line: JSONL (one JSON object a line), or CSV with a header
(``.csv``; columns are input fields, dotted names nest: ``output.uri``; an empty cell means "use the
default"). ``task`` defaults to ``generate``. Every line is validated with the worker's own contract
(audioldm.contract) first, so a bad line is reported with its line number and never costs a GPU
second, while the good lines still run. Jobs run ``--concurrency`` at a time: submit with POST /run,
then poll /status until a terminal state (COMPLETED, FAILED, CANCELLED, TIMED_OUT).

Results go to a manifest (JSONL, one line per input line; default ``<input>.results.jsonl``). It is
appended to as jobs finish, so an interrupted batch loses nothing, and compacted at the end. A rerun
skips lines whose input is unchanged and COMPLETED in the manifest, resumes polling jobs that were
submitted but not finished (instead of paying for them twice), and submits the rest again.

Transient HTTP failures (connection errors, 429, 5xx) are retried with exponential backoff, at most
``--retries`` times per request; when a request still fails, the batch stops submitting (the API is
evidently down) and a rerun picks up the rest. The exit code is 0 only when every line completed.

Against the runpod SDK's local test server (``python handler.py --rp_serve_api``) use
``--base-url http://127.0.0.1:8000 --concurrency 1``. That server runs a /run job inside the first
/status call and then forgets it, and it has no /cancel; this client polls each job from one thread
only, treats the first terminal answer as final, and reports /cancel's 404 as "not supported by this
API". Keep it to one job at a time there: overlapping /status calls run their jobs at the same time
in the one worker process, which shares one pipeline (and its scheduler) between them; on RunPod
each worker takes one job at a time.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests
from pydantic import ValidationError

from audioldm.contract import describe_validation_error, parse_job

DEFAULT_API_BASE = "https://api.runpod.ai/v2"
API_KEY_ENV = "RUNPOD_API_KEY"
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
# Manifest-only states: a line that never became a job, a job the client lost track of.
INVALID = "INVALID"
SUBMITTED = "SUBMITTED"
CLIENT_ERROR = "CLIENT_ERROR"
STOPPED: dict[str, Any] = {}  # sentinel: the batch stopped before this job ended
LOCAL_API_UNKNOWN_JOB = "Job ID not found"  # the SDK's local API: FAILED with this error, HTTP 200
USER_AGENT = "audioldm-client/1"


# ---------------------------------------------------------------------------------------------
# HTTP: the RunPod serverless API
# ---------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A request that failed for good; ``status`` is the HTTP status, None without an answer."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ApiUnavailable(ApiError):
    """Transient failures outlasted the retries: the API is down or throttling hard."""


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5  # after the first attempt
    backoff_s: float = 1.0  # first wait; doubles each time, with jitter
    max_backoff_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        # Jitter spreads the retries of many threads that failed at the same moment.
        wanted = retry_after if retry_after is not None else self.backoff_s * 2 ** (attempt - 1)
        return min(self.max_backoff_s, wanted) * random.uniform(0.8, 1.2)


class RunPodApi:
    """POST {base}/run, GET|POST {base}/status/{id}, POST {base}/cancel/{id}, with retries."""

    def __init__(self, base_url: str, api_key: str | None, retry: RetryPolicy = RetryPolicy(),
                 timeout_s: float = 30.0, status_timeout_s: float = 900.0):
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self.timeout_s = timeout_s
        # The SDK's local API runs the whole job inside /status, so that answer can take as long
        # as the job; on the platform /status answers at once and the long timeout costs nothing.
        self.status_timeout_s = status_timeout_s
        self._api_key = api_key
        self._session = requests.Session()
        self._session.headers.update({"Content-Type": "application/json", "Accept": "application/json",
                                      "User-Agent": USER_AGENT})
        if api_key:
            # As auth, not a plain header: then a ~/.netrc entry cannot replace it, and requests
            # drops it when a redirect leaves the host.
            self._session.auth = _Bearer(api_key)
        # The platform documents GET (the SDK uses it); the SDK's local API routes only POST.
        self._status_method = "GET"
        self._lock = threading.Lock()
        self.retries_done = 0

    def __enter__(self) -> RunPodApi:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._session.close()

    def run(self, job_input: dict[str, Any], webhook: str | None = None,
            policy: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"input": job_input}
        if webhook:
            body["webhook"] = webhook
        if policy:
            body["policy"] = policy
        # No retry on a read timeout: the job may exist already, and a retry would pay for it twice.
        return self._request("POST", "run", body, self.timeout_s, retry_read_timeout=False)

    def status(self, job_id: str) -> dict[str, Any]:
        try:
            return self._request(self._status_method, f"status/{job_id}", None, self.status_timeout_s)
        except ApiError as exc:
            if exc.status != 405 or self._status_method == "POST":
                raise
        self._status_method = "POST"
        return self._request("POST", f"status/{job_id}", None, self.status_timeout_s)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"cancel/{job_id}", None, self.timeout_s)

    def _request(self, method: str, path: str, body: dict[str, Any] | None, timeout_s: float,
                 retry_read_timeout: bool = True) -> dict[str, Any]:
        url = f"{self.base_url}/{path}"
        attempt = 0
        while True:
            attempt += 1
            outcome, retry_after = self._attempt(method, url, body, timeout_s, retry_read_timeout)
            if isinstance(outcome, dict):
                return outcome
            if attempt > self.retry.retries:
                raise ApiUnavailable(self._redact(
                    f"{method} {url}: gave up after {attempt} attempts; last: {outcome}"))
            with self._lock:
                self.retries_done += 1
            time.sleep(self.retry.delay(attempt, retry_after))

    def _attempt(self, method: str, url: str, body: dict[str, Any] | None, timeout_s: float,
                 retry_read_timeout: bool) -> tuple[dict[str, Any] | str, float | None]:
        """The answer, or (why it is worth retrying, the server's Retry-After); raises ApiError."""
        try:
            response = self._session.request(method, url, json=body, timeout=timeout_s)
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            # Refused, reset, DNS, connect timeout, a body cut short.
            return f"connection failed: {str(exc)[:300]}", None
        except requests.Timeout as exc:
            if not retry_read_timeout:
                raise ApiError(f"{method} {url}: no answer within {timeout_s:.0f}s; the job may or may "
                               "not have been submitted") from exc
            return f"no answer within {timeout_s:.0f}s", None
        except requests.RequestException as exc:  # a bad URL and the like: retrying will not help
            raise ApiError(self._redact(f"{method} {url}: {type(exc).__name__}: {exc}")) from exc
        if response.status_code == 429 or response.status_code >= 500:
            return f"HTTP {response.status_code} {_detail(response)}", _retry_after(response)
        if response.status_code == 401:
            raise ApiError(f"{method} {url}: HTTP 401 unauthorized; check ${API_KEY_ENV}", 401)
        if response.status_code >= 400:
            raise ApiError(self._redact(f"{method} {url}: HTTP {response.status_code} {_detail(response)}"),
                           response.status_code)
        try:
            answer = response.json()
        except ValueError as exc:
            raise ApiError(f"{method} {url}: answer is not JSON: {response.text[:200]!r}") from exc
        if not isinstance(answer, dict):
            raise ApiError(f"{method} {url}: expected a JSON object, got {type(answer).__name__}")
        return answer, None

    def _redact(self, text: str) -> str:
        # Belt and braces: no message we raise has a reason to hold the key, but none may.
        return text.replace(self._api_key, "***") if self._api_key else text


class _Bearer(requests.auth.AuthBase):
    """``Authorization: Bearer <key>``, the header the runpod SDK sends."""

    def __init__(self, key: str):
        self._key = key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._key}"
        return request


def _detail(response: requests.Response) -> str:
    text = (response.text or response.reason or "").strip().replace("\n", " ")
    return text[:300]


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # absent, or an HTTP date: our own backoff is good enough


# ---------------------------------------------------------------------------------------------
# Reading the batch: one job input per line, validated by the worker's contract
# ---------------------------------------------------------------------------------------------


@dataclass
class Line:
    """One input line: a validated job input, or why it is not one."""

    number: int
    key: str  # hash of the normalised input (or of the raw text of a bad line)
    job_input: dict[str, Any] | None = None
    error: str | None = None
    raw: dict[str, Any] | None = None  # a contract-invalid line's input, for the manifest


def read_lines(path: Path, defaults: dict[str, Any]) -> list[Line]:
    text = path.read_text(encoding="utf-8-sig")  # Excel writes a BOM in front of CSV headers
    rows = _csv_rows(text) if path.suffix.lower() == ".csv" else _jsonl_rows(text)
    return [_validate(number, raw, defaults) for number, raw in rows]


def _jsonl_rows(text: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, parsed object) per non-blank line; a string is an error message."""
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends unescaped.
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            yield number, f"invalid JSON: {exc.msg} (column {exc.colno})"
            continue
        yield number, value if isinstance(value, dict) else f"expected a JSON object, got {type(value).__name__}"


def _csv_rows(text: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [name.strip() for name in next(reader, [])]
    if not header or not all(header):
        yield 1, "CSV header missing or has an empty column name"
        return
    start = reader.line_num + 1
    for cells in reader:
        number, start = start, reader.line_num + 1  # a quoted cell may span lines: report the first
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) > len(header):
            yield number, f"{len(cells)} cells but {len(header)} header columns"
            continue
        try:
            yield number, _nest({name: cell for name, cell in zip(header, cells) if cell.strip()})
        except ValueError as exc:
            yield number, str(exc)


def _nest(flat: dict[str, str]) -> dict[str, Any]:
    """{"output.uri": x} -> {"output": {"uri": x}}; values stay strings for the contract to convert."""
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ValueError(f"column {name!r} nests under {parent!r}, which is also a plain column")
        if leaf in node:
            raise ValueError(f"column {name!r} appears twice or clashes with a nested column")
        node[leaf] = value.strip()
    return nested


def _validate(number: int, raw: dict[str, Any] | str, defaults: dict[str, Any]) -> Line:
    if isinstance(raw, str):
        return Line(number, _hash(raw), error=raw)
    merged = _merge({"task": "generate", **defaults}, raw)
    try:
        spec = parse_job(merged)
    except ValidationError as exc:
        return Line(number, _hash(merged), raw=merged, error=describe_validation_error(exc))
    # Sent as normalised by the contract: CSV strings become numbers, prompts are trimmed, and the
    # hash ignores formatting, so a reformatted file still matches its manifest.
    normalised = spec.model_dump(mode="json", exclude_unset=True)
    return Line(number, _hash(normalised), job_input=normalised)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _hash(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The manifest: what happened to each line, durable across interruptions
# ---------------------------------------------------------------------------------------------


class Manifest:
    """JSONL of records keyed by line number; the last record for a line wins."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self.records: dict[int, dict[str, Any]] = self._load()

    def _load(self) -> dict[int, dict[str, Any]]:
        records: dict[int, dict[str, Any]] = {}
        if not self.path.exists():
            return records
        for raw in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(raw)
                records[int(record["line"])] = record
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a killed run: that line just runs again
        return records

    def write(self, record: dict[str, Any]) -> None:
        """Append and flush at once, so a killed client has still recorded every job id."""
        record = {**record, "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        with self._lock:
            self.records[record["line"]] = record
            with open(self.path, "a", encoding="utf-8") as out:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                os.fsync(out.fileno())

    def compact(self) -> None:
        """Rewrite with one record per line, in line order; atomic, so never half-written."""
        with self._lock:
            temp = self.path.with_name(self.path.name + ".tmp")
            with open(temp, "w", encoding="utf-8") as out:
                for number in sorted(self.records):
                    out.write(json.dumps(self.records[number], ensure_ascii=False) + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, self.path)


def output_uris(output: Any) -> list[str]:
    """Every stored file a result names: generate's outputs[].uri, fine-tune's checkpoint/uris."""
    found: list[str] = []
    if isinstance(output, dict):
        for key, value in output.items():
            if key in ("uri", "checkpoint") and isinstance(value, str):
                found.append(value)
            else:
                found.extend(output_uris(value))
    elif isinstance(output, list):
        for item in output:
            found.extend(output_uris(item))
    return list(dict.fromkeys(found))


def has_inline_audio(output: Any) -> bool:
    if isinstance(output, dict):
        return "audio_base64" in output or any(has_inline_audio(v) for v in output.values())
    return isinstance(output, list) and any(has_inline_audio(item) for item in output)


# ---------------------------------------------------------------------------------------------
# Running a batch
# ---------------------------------------------------------------------------------------------


@dataclass
class Counts:
    total: int = 0
    skipped: int = 0  # completed in an earlier run
    submitted: int = 0
    resumed: int = 0  # submitted by an earlier run, polled to its end by this one
    completed: int = 0
    failed: int = 0
    invalid: int = 0
    unfinished: int = 0  # not submitted, or not polled to its end: the API became unavailable
    running: int = 0


@dataclass
class BatchOptions:
    concurrency: int = 8
    webhook: str | None = None
    policy: dict[str, Any] | None = None
    poll_interval_s: float = 2.0
    max_poll_interval_s: float = 15.0
    progress: bool | None = None  # None: a bar when stderr is a terminal


@dataclass
class Batch:
    api: RunPodApi
    manifest: Manifest
    options: BatchOptions
    counts: Counts = field(default_factory=Counts)
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _bar: Any = None
    _warned_inline: bool = False

    def run(self, lines: list[Line]) -> Counts:
        self.counts.total = len(lines)
        todo = [line for line in lines if self._needs_work(line)]
        self._bar = _progress_bar(len(todo), self.options.progress)
        try:
            self._run_all(todo)
        finally:
            self._bar.close()
            self.manifest.compact()
        return self.counts

    def _needs_work(self, line: Line) -> bool:
        if line.error is not None:
            self.counts.invalid += 1
            self.manifest.write({"line": line.number, "input_hash": line.key, "input": line.raw,
                                 "status": INVALID, "error": line.error})
            _say(f"line {line.number}: {line.error}")
            return False
        previous = self.manifest.records.get(line.number)
        if previous and previous.get("input_hash") == line.key and previous.get("status") == "COMPLETED":
            self.counts.skipped += 1
            return False
        return True

    def _run_all(self, todo: list[Line]) -> None:
        pending: set[Future[None]] = set()
        with ThreadPoolExecutor(max_workers=self.options.concurrency, thread_name_prefix="job") as pool:
            try:
                pending = {pool.submit(self._one, line) for line in todo}
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()  # a bug in _one must not pass silently
            except KeyboardInterrupt:
                # Jobs already submitted stay SUBMITTED in the manifest; a rerun resumes them.
                _say("interrupted: finishing the requests in flight; rerun to continue")
                self.stop.set()
                for future in pending:
                    future.cancel()
                raise

    def _one(self, line: Line) -> None:
        record = {"line": line.number, "input_hash": line.key, "input": line.job_input}
        self._set_running(+1)
        try:
            final = self._resume(line, record)
            if final is None:
                final = self._submit_and_poll(line, record)
        finally:
            self._set_running(-1)
        self._finish(record, final)

    def _resume(self, line: Line, record: dict[str, Any]) -> dict[str, Any] | None:
        """The end of a job an earlier run submitted; None when there is none, or the API forgot it."""
        previous = self.manifest.records.get(line.number) or {}
        job_id = previous.get("job_id")
        if not job_id or previous.get("input_hash") != line.key or previous.get("status") in TERMINAL:
            return None
        try:
            final = self._poll(job_id)
        except ApiError as exc:
            return None if exc.status == 404 else self._client_error(job_id, exc)
        if _is_unknown_job(final):
            return None
        if final is not STOPPED:
            with self._lock:
                self.counts.resumed += 1
        return final

    def _submit_and_poll(self, line: Line, record: dict[str, Any]) -> dict[str, Any]:
        if self.stop.is_set():
            return STOPPED
        try:
            answer = self.api.run(line.job_input or {}, self.options.webhook, self.options.policy)
        except ApiError as exc:
            return self._client_error(None, exc)
        job_id = str(answer.get("id") or "")
        if not job_id:
            return self._client_error(None, ApiError(f"/run answered without a job id: {answer}"))
        with self._lock:
            self.counts.submitted += 1
        self.manifest.write({**record, "job_id": job_id, "status": SUBMITTED})
        try:
            return self._poll(job_id)
        except ApiError as exc:
            return self._client_error(job_id, exc)

    def _poll(self, job_id: str) -> dict[str, Any]:
        """The terminal /status answer, or STOPPED.

        One thread per job and nothing in parallel for it: the local API would run a job twice
        if two /status calls for it overlapped, and it forgets the job after the first terminal
        answer, so that answer is final.
        """
        interval = self.options.poll_interval_s
        while True:
            if self.stop.is_set():
                return STOPPED
            status = self.api.status(job_id)
            if status.get("status") in TERMINAL:
                return status
            self.stop.wait(interval)
            interval = min(self.options.max_poll_interval_s, interval * 1.5)

    def _client_error(self, job_id: str | None, exc: ApiError) -> dict[str, Any]:
        if isinstance(exc, ApiUnavailable) and not self.stop.is_set():
            _say(f"API unavailable, submitting no more jobs: {exc}")
            self.stop.set()
        return {"status": CLIENT_ERROR, "id": job_id, "error": str(exc)}

    def _finish(self, record: dict[str, Any], final: dict[str, Any]) -> None:
        if final is STOPPED:  # a submitted job stays SUBMITTED in the manifest for a rerun
            with self._lock:
                self.counts.unfinished += 1
            return
        status = str(final.get("status"))
        output = final.get("output")
        entry = {**record, "job_id": final.get("id"), "status": status, "uris": output_uris(output),
                 "error": _error_text(final) if status != "COMPLETED" else None}
        for key in ("delayTime", "executionTime"):  # the platform's timings, in ms
            if key in final:
                entry[key] = final[key]
        self.manifest.write(entry)
        self._count_final(entry, output)

    def _count_final(self, entry: dict[str, Any], output: Any) -> None:
        with self._lock:
            if entry["status"] == "COMPLETED":
                self.counts.completed += 1
            else:
                self.counts.failed += 1
            self._bar.update(1)
            self._refresh_bar()
        if entry["status"] != "COMPLETED":
            _say(f"line {entry['line']}: {entry['status']} (job {entry['job_id']}): {entry['error']}")
        elif has_inline_audio(output) and not self._warned_inline:
            self._warned_inline = True
            _say("note: results came back inline (no output.uri); this client keeps only URIs, so "
                 "set output.uri (or the worker's OUTPUT_URI) for batches")

    def _set_running(self, delta: int) -> None:
        with self._lock:
            self.counts.running += delta
            self._refresh_bar()

    def _refresh_bar(self) -> None:
        c = self.counts
        self._bar.set_postfix_str(f"done={c.completed} failed={c.failed} running={c.running}", refresh=True)


def _is_unknown_job(status: dict[str, Any]) -> bool:
    return status.get("status") == "FAILED" and status.get("error") == LOCAL_API_UNKNOWN_JOB


def _error_text(status: dict[str, Any]) -> str:
    error = status.get("error")
    if error is None:
        return f"job ended {status.get('status')}"
    return error if isinstance(error, str) else json.dumps(error)


def _progress_bar(total: int, enabled: bool | None) -> Any:
    from tqdm import tqdm  # only submit needs it

    # disable=None: tqdm draws only when stderr is a terminal, so logs and CI stay clean.
    return tqdm(total=total, unit="job", file=sys.stderr, dynamic_ncols=True,
                disable=None if enabled is None else not enabled)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class UsageError(Exception):
    pass


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object")
    return value


def _api_from_args(args: argparse.Namespace) -> RunPodApi:
    if args.base_url:
        base = args.base_url
    elif args.endpoint:
        base = f"{DEFAULT_API_BASE}/{args.endpoint}"
    else:
        raise UsageError("give --endpoint ENDPOINT_ID (or $RUNPOD_ENDPOINT_ID), or --base-url")
    key = os.environ.get(API_KEY_ENV) or None
    if key is None and base.startswith(DEFAULT_API_BASE):
        raise UsageError(f"set ${API_KEY_ENV} to your RunPod API key")
    retry = RetryPolicy(retries=args.retries, backoff_s=args.backoff, max_backoff_s=args.max_backoff)
    return RunPodApi(base, key, retry, timeout_s=args.timeout, status_timeout_s=args.status_timeout)


def cmd_submit(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if args.webhook and not args.webhook.startswith(("http://", "https://")):
        raise UsageError("--webhook must be an http:// or https:// URL")
    policy = _json_object(args.policy, "--policy") if args.policy else None
    defaults = _json_object(args.defaults, "--defaults") if args.defaults else {}
    if not args.input.is_file():
        raise UsageError(f"no such file: {args.input}")
    lines = read_lines(args.input, defaults)
    manifest = Manifest(args.results or args.input.with_name(args.input.name + ".results.jsonl"))
    options = BatchOptions(concurrency=args.concurrency, webhook=args.webhook, policy=policy,
                           poll_interval_s=args.poll_interval, progress=args.progress)
    with _api_from_args(args) as api:
        try:
            counts = Batch(api, manifest, options).run(lines)
        except KeyboardInterrupt:
            _say(f"manifest: {manifest.path}")
            return 130
    summary = {k: v for k, v in vars(counts).items() if k != "running"}
    summary.update(retries=api.retries_done, manifest=str(manifest.path))
    print(json.dumps(summary))
    _say(" ".join(f"{k}={v}" for k, v in summary.items()))
    ok = counts.failed == counts.invalid == counts.unfinished == 0
    return 0 if ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    with _api_from_args(args) as api:
        print(json.dumps(api.status(args.job_id), indent=2))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    with _api_from_args(args) as api:
        return _wait(api, args)


def _wait(api: RunPodApi, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.wait_timeout if args.wait_timeout else None
    interval, last_output = args.poll_interval, None
    while True:
        status = api.status(args.job_id)
        state = status.get("status")
        if state in TERMINAL:
            print(json.dumps(status, indent=2))
            return 0 if state == "COMPLETED" else 1
        # A fine-tune reports its progress as the IN_PROGRESS output: show each change once.
        if status.get("output") is not None and status.get("output") != last_output:
            last_output = status["output"]
            _say(f"{state}: {json.dumps(last_output)}")
        if deadline is not None and time.monotonic() > deadline:
            _say(f"still {state} after {args.wait_timeout:.0f}s; the job keeps running")
            return 3
        time.sleep(interval)
        interval = min(15.0, interval * 1.5)


def cmd_cancel(args: argparse.Namespace) -> int:
    try:
        with _api_from_args(args) as api:
            answer = api.cancel(args.job_id)
    except ApiError as exc:
        if exc.status in (404, 405):
            raise ApiError(f"cancel is not supported by this API, or it does not know job {args.job_id} "
                           f"({exc}); the runpod SDK's local test API (--rp_serve_api) has no /cancel",
                           exc.status) from exc
        raise
    print(json.dumps(answer, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("API")
    where.add_argument("--endpoint", default=os.environ.get("RUNPOD_ENDPOINT_ID"),
                       help="RunPod endpoint id (default: $RUNPOD_ENDPOINT_ID); API key from $RUNPOD_API_KEY")
    where.add_argument("--base-url", help=f"any RunPod-compatible API instead of {DEFAULT_API_BASE}/<endpoint>, "
                       "e.g. http://127.0.0.1:8000 for handler.py --rp_serve_api")
    where.add_argument("--retries", type=int, default=5, help="retries per request on connection errors, "
                       "429 and 5xx (default 5)")
    where.add_argument("--backoff", type=float, default=1.0, help="first retry delay in s, doubling (default 1)")
    where.add_argument("--max-backoff", type=float, default=30.0, help="longest retry delay in s (default 30)")
    where.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in s (default 30)")
    where.add_argument("--status-timeout", type=float, default=900.0,
                       help="HTTP timeout for /status in s (default 900: the local API runs the job inside it)")
    where.add_argument("--poll-interval", type=float, default=2.0, help="first /status poll delay in s (default 2)")

    parser = argparse.ArgumentParser(prog="python -m audioldm.client",
                                     description="Submit and track AudioLDM2 worker jobs on RunPod serverless.")
    commands = parser.add_subparsers(dest="command", required=True)

    submit = commands.add_parser("submit", parents=[common], help="run a batch of jobs from JSONL or CSV",
                                 description="Run one job per line of a JSONL file (one job input object a line) "
                                 "or a CSV file with a header (columns are input fields; output.uri nests).")
    submit.add_argument("input", type=Path, help="jobs: .jsonl (one input object a line) or .csv with a header")
    submit.add_argument("--results", type=Path, help="manifest path (default: <input>.results.jsonl)")
    submit.add_argument("--concurrency", type=int, default=8, help="jobs in flight at once (default 8)")
    submit.add_argument("--webhook", help="URL RunPod POSTs each job's result to")
    submit.add_argument("--policy", help='execution policy for every job, JSON, e.g. \'{"executionTimeout": 900000}\'')
    submit.add_argument("--defaults", help='JSON merged under every line, e.g. \'{"output": {"uri": "s3://b/x/"}}\'')
    bar = submit.add_mutually_exclusive_group()
    bar.add_argument("--progress", action="store_true", default=None, help="always draw the progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never draw it")
    submit.set_defaults(func=cmd_submit)

    for name, func, text in (("status", cmd_status, "print a job's status"),
                             ("cancel", cmd_cancel, "cancel a queued or running job")):
        sub = commands.add_parser(name, parents=[common], help=text, description=text)
        sub.add_argument("job_id")
        sub.set_defaults(func=func)
    waiter = commands.add_parser("wait", parents=[common], help="poll a job until it ends, showing its progress",
                                 description="Poll until the job ends; print its final status (exit 0 only "
                                 "when COMPLETED). A fine-tune's progress is printed to stderr as it changes.")
    waiter.add_argument("job_id")
    waiter.add_argument("--wait-timeout", type=float, default=None, help="give up waiting after this many s")
    waiter.set_defaults(func=cmd_wait)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        _say(f"error: {exc}")
        return 2
    except ApiError as exc:
        _say(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
