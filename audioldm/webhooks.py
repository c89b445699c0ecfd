"""A small receiver for RunPod job webhooks: each completion becomes one JSON file.

    python -m audioldm.webhooks --port 8080 --out completions/ [--host 127.0.0.1] [--token SECRET]

Submit jobs with ``"webhook": "https://your.host/hook?token=SECRET"`` (the client's ``--webhook``).
When a job ends, RunPod POSTs a JSON body to that URL and this server stores it as
``<out>/<job id>.json``, written to a temporary file and renamed, so a reader never sees half a file.
The answer (200, ``{"stored": "<name>"}``) is sent only once the file is on disk, because a 200 is
what tells RunPod to stop retrying.

What arrives:
- The platform posts the ``/status``-like body: ``{"id", "status", "output", "delayTime",
  "executionTime", ...}``, for failed jobs too (``status`` FAILED, ``error``), and retries twice,
  10 s apart, when the answer is not 2xx. A retry overwrites the same file: storing is idempotent.
- The runpod SDK's local test API (``handler.py --rp_serve_api``) posts only ``{"output": ...}``,
  only for successful jobs; with no id, the file is named by a fresh uuid.

What is checked, since RunPod does not sign its webhooks (no HMAC header to verify):
- With ``--token`` (or ``$WEBHOOK_TOKEN``), the URL must carry ``?token=<the same>``, compared in
  constant time; otherwise 403 and the body is not even read. This only proves the sender knows
  the URL: serve it over HTTPS (e.g. behind a TLS-terminating reverse proxy), or the token travels
  in clear, and treat the stored output as data from the network.
- Content-Type must be JSON (415), Content-Length present (411) and at most ``--max-bytes``
  (413; default 20 MiB, RunPod's largest response), the body a JSON object (400) holding
  ``output``, or ``id`` and ``status`` (422). Nothing is stored for a rejected request.

It binds 127.0.0.1 by default; to take calls from RunPod, put it behind a public HTTPS proxy or
pass ``--host 0.0.0.0`` on a host that terminates TLS in front of it.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import re
import sys
import tempfile
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("audioldm.webhooks")

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
TOKEN_ENV = "WEBHOOK_TOKEN"
SOCKET_TIMEOUT_S = 30  # a sender that stalls mid-body must not hold a thread forever
DRAIN_LIMIT = 1024 * 1024  # how much of a rejected body we read (and drop) before answering
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


class Rejected(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Receiver(ThreadingHTTPServer):
    """The HTTP server, holding what every request handler needs."""

    daemon_threads = True  # a hung sender must not keep the process alive on shutdown

    def __init__(self, address: tuple[str, int], out_dir: Path, token: str | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        super().__init__(address, WebhookHandler)
        self.out_dir = out_dir
        self.token = token or None
        self.max_bytes = max_bytes
        out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class WebhookHandler(BaseHTTPRequestHandler):
    server: Receiver
    timeout = SOCKET_TIMEOUT_S
    server_version = "audioldm-webhooks/1"
    sys_version = ""  # do not advertise the Python version

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self._body_read = False
        try:
            self._check_token()
            body = self._read_json()
            name = store(self.server.out_dir, body)
        except Rejected as exc:
            self._discard_body()
            self._answer(exc.status, {"error": str(exc)})
            return
        except OSError:  # disk full, permissions: a 5xx makes the platform send it again
            log.exception("could not store a completion")
            self._answer(500, {"error": "could not store the completion"})
            return
        log.info("stored %s (status %s)", name, body.get("status", "-"))
        self._answer(200, {"stored": name})

    def do_GET(self) -> None:  # noqa: N802
        self._answer(405, {"error": "POST a job's JSON here"})

    do_PUT = do_DELETE = do_PATCH = do_GET  # noqa: N815

    def _check_token(self) -> None:
        if self.server.token is None:
            return
        given = parse_qs(urlsplit(self.path).query).get("token", [""])[0]
        # compare_digest: the time taken does not tell how much of a guess was right.
        if not hmac.compare_digest(given.encode(), self.server.token.encode()):
            raise Rejected(403, "missing or wrong token")

    def _read_json(self) -> dict[str, Any]:
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise Rejected(415, "Content-Type must be application/json")
        length = self._content_length()
        raw = self.rfile.read(length)
        self._body_read = True
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Rejected(400, f"body is not JSON: {exc}") from exc
        check_shape(body)
        return body

    def _content_length(self) -> int:
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise Rejected(411, "Content-Length required")
        try:
            length = int(raw)
        except ValueError as exc:
            raise Rejected(400, "bad Content-Length") from exc
        if length < 0:
            raise Rejected(400, "bad Content-Length")
        if length > self.server.max_bytes:
            raise Rejected(413, f"body over {self.server.max_bytes} bytes")
        return length

    def _discard_body(self) -> None:
        """Read (a bounded part of) a rejected body before answering and closing: closing a socket
        with unread data resets the connection, and the sender could lose our 4xx to the reset."""
        if self._body_read:
            return
        try:
            remaining = min(int(self.headers.get("Content-Length") or 0), DRAIN_LIMIT)
        except ValueError:
            return
        while remaining > 0:
            chunk = self.rfile.read(min(65536, remaining))
            if not chunk:
                return
            remaining -= len(chunk)

    def _answer(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        # http.server would print the request line, token and all: log the path without its query.
        log.debug("%s %s", getattr(self, "command", "-"), urlsplit(getattr(self, "path", "")).path)


def check_shape(body: Any) -> None:
    """The platform's body has id/status/output; the local API's only output."""
    if not isinstance(body, dict):
        raise Rejected(400, "body must be a JSON object")
    if "output" not in body and not ("id" in body and "status" in body):
        raise Rejected(422, "not a job completion: expected 'output', or 'id' and 'status'")
    if "id" in body and not isinstance(body["id"], str):
        raise Rejected(422, "'id' must be a string")


def store(out_dir: Path, body: dict[str, Any]) -> str:
    """Write ``body`` as ``<job id>.json`` (a uuid without a usable id) atomically; return the name."""
    job_id = body.get("id")
    stem = job_id if isinstance(job_id, str) and _SAFE_ID.match(job_id) else f"no-id-{uuid.uuid4()}"
    name = f"{stem}.json"
    fd, temp = tempfile.mkstemp(prefix=".incoming-", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(body, out, indent=2, ensure_ascii=False)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, out_dir / name)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m audioldm.webhooks",
                                     description="Store RunPod job webhooks as <out>/<job id>.json.")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    parser.add_argument("--out", type=Path, default=Path("completions"), help="directory for the files")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"require ?token=<this> on every call (default: ${TOKEN_ENV}; prefer the "
                        "variable, as command lines are visible to other users)")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest body accepted")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = Receiver((args.host, args.port), args.out, token=args.token, max_bytes=args.max_bytes)
    # The line tests and scripts wait for; the token is never printed.
    print(f"listening on {server.url}, storing to {args.out}"
          f"{' (token required)' if server.token else ''}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
