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


def tone_dataset_zip(path, frequencies=(220, 330, 440, 550, 660, 880), seconds: float = 2.0,
                     sample_rate: int = 16000) -> "Path":
    """A small valid dataset: pure tones in a subfolder, captioned by pitch."""
    import csv
    import zipfile

    rows = []
    with zipfile.ZipFile(path, "w") as archive:
        for index, frequency in enumerate(frequencies):
            t = np.arange(int(sample_rate * seconds)) / sample_rate
            audio = (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
            buffer = io.BytesIO()
            sf.write(buffer, audio, sample_rate, format="WAV")
            name = f"wavs/tone-{index}.wav"
            archive.writestr(name, buffer.getvalue())
            rows.append((name, f"a pure tone at {frequency} hertz"))
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["audio", "caption"])
        writer.writerows(rows)
        archive.writestr("metadata.csv", text.getvalue())
    return path
