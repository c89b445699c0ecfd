"""The worker's own local API server (``python handler.py --rp_serve_api``) as a test helper.

Shared by the modules that need a real RunPod-compatible HTTP API (test_runpod_api.py,
test_client.py, test_webhooks.py). The ``api`` fixture in conftest.py starts one for the session
from ``start_api_server``; nothing here is mocked.

What runpod 1.12.0's local API does is listed in test_runpod_api.py's docstring; the short of it:
``/run`` only stores a job, the first ``POST /status/{id}`` runs it and forgets it, no /cancel.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from s3server import SeaweedS3

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 120.0  # tiny model load + uvicorn; ~3-8 s on 2 CPU cores
HTTP_TIMEOUT_S = 120.0  # one tiny job takes well under 5 s; generous for loaded CI machines

# Loopback only: never route the test's own requests through a proxy from the environment.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ApiServer:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(empty log)"

    def post(self, path: str, body: dict | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else b""
        request = urllib.request.Request(
            self.base_url + path, data=data, method="POST", headers={"Content-Type": "application/json"})
        try:
            with HTTP.open(request, timeout=HTTP_TIMEOUT_S) as response:
                assert response.status == 200, response.status
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            pytest.fail(f"POST {path} -> HTTP {exc.code}: {exc.read()[:2000]!r}\n"
                        f"server log tail:\n{self.log_tail()}")
        except (urllib.error.URLError, TimeoutError) as exc:
            pytest.fail(f"POST {path} failed: {exc}\nserver log tail:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # uvicorn shuts down cleanly on SIGTERM
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def _wait_ready(server: ApiServer, deadline: float) -> str | None:
    """None once the API answers; else why not ('port race' to retry, or a message)."""
    while True:
        if server.proc.poll() is not None:
            if "address already in use" in server.log_text().lower():
                return "port race"
            return f"worker exited with code {server.proc.returncode} before serving"
        try:
            with HTTP.open(f"{server.base_url}/openapi.json", timeout=2) as response:
                if response.status == 200:
                    return None
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            return f"API did not answer on port {server.port} within {STARTUP_TIMEOUT_S:.0f}s"
        time.sleep(0.2)


def _start(env: dict[str, str], log_path: Path) -> ApiServer:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    for _ in range(3):  # the free port may be taken before uvicorn binds it; retry with a fresh one
        port = free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "handler.py", "--rp_serve_api",
                 "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        server = ApiServer(proc, port, log_path)
        problem = _wait_ready(server, deadline)
        if problem is None:
            return server
        server.stop()
        if problem != "port race":
            pytest.fail(f"{problem}\nserver log tail:\n{server.log_tail()}")
    pytest.fail(f"could not bind a free port for the API in 3 tries\nserver log tail:\n{server.log_tail()}")


def server_env(s3: SeaweedS3, tiny_model_dir: Path, home: Path) -> dict[str, str]:
    """The user's environment, minus anything that would point the worker somewhere else."""
    (home / "outputs").mkdir(exist_ok=True)
    (home / "models").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BUCKET_", "AWS_", "RUNPOD_"))
           and k not in ("OUTPUT_URI", "DEVICE", "TORCH_DTYPE", "INLINE_MAX_BYTES")}
    env.update(
        DEFAULT_MODEL="tiny",
        HF_HUB_OFFLINE="1",
        AUDIOLDM_TINY_DIR=str(tiny_model_dir),  # built once per session by conftest
        LOCAL_STORAGE_ROOTS=str(home / "outputs"),
        MODEL_SEARCH_DIRS=str(home / "models"),
        BUCKET_ENDPOINT_URL=s3.endpoint_url,
        BUCKET_ACCESS_KEY_ID=s3.access_key,
        BUCKET_SECRET_ACCESS_KEY=s3.secret_key,
        DEVICE="cpu",
        PYTHONUNBUFFERED="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    # One torch thread unless the caller says otherwise: on a 2-core machine with anything else
    # busy, torch's default (one thread per core) made each tiny job ~60x slower (0.3 s -> 20 s).
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start_api_server(s3: SeaweedS3, tiny_model_dir: Path, home: Path) -> ApiServer:
    """Start ``handler.py --rp_serve_api`` on 127.0.0.1 (tiny model, CPU, BUCKET_* = ``s3``).

    Returns once the model is warm and the API answers; the caller must ``stop()`` it.
    """
    return _start(server_env(s3, tiny_model_dir, home), home / "worker.log")
