"""Small helpers shared by the tests (not fixtures)."""

from __future__ import annotations

import io
import urllib.request

import numpy as np
import soundfile as sf

from s3server import SeaweedS3


def s3_config(server: SeaweedS3, bucket: str | None = None, secret: str | None = None,
              access_key: str | None = None) -> dict:
    """A RunPod request's top-level s3Config for the test server."""
    return {
        "accessId": access_key or server.access_key,
        "accessSecret": secret or server.secret_key,
        "bucketName": bucket,
        "endpointUrl": server.endpoint_url,
    }


def read_object(server: SeaweedS3, uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return server.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def list_keys(server: SeaweedS3, bucket: str) -> list[str]:
    response = server.client().list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in response.get("Contents", []))


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    return audio, rate


def fetch_url(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()
