"""Where a job's audio goes, and how it is encoded on the way."""

from __future__ import annotations

import base64
import io
import re
import unicodedata

import numpy as np
import soundfile as sf

from audioldm.contract import OutputSpec
from audioldm.errors import JobError
from audioldm.settings import Settings
from audioldm.storage import join

CONTENT_TYPES = {"wav": "audio/wav", "flac": "audio/flac"}
DEFAULT_PREFIX_IN_JOB_BUCKET = "audioldm2-outputs/"


def safe_job_id(job_id: str) -> str:
    # RunPod ids are uuid-like; anything else is squeezed into a safe object-key segment.
    return re.sub(r"[^A-Za-z0-9_.-]", "-", job_id)[:128].strip(".-") or "job"


def slug(text: str, max_chars: int = 40) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:max_chars].strip("-") or "audio"


def job_destination(output: OutputSpec | None, settings: Settings, job_bucket: str | None, job_id: str) -> str | None:
    """The directory URI for this job's files, or None for results inline in the response.

    Precedence: the job's ``output.uri``; the worker's OUTPUT_URI; the bucket named in the
    request's s3Config; else inline.
    """
    base = output.uri if output and output.uri else settings.output_uri
    if base is None and job_bucket:
        base = f"s3://{job_bucket}/{DEFAULT_PREFIX_IN_JOB_BUCKET}"
    return join(base, safe_job_id(job_id)) if base else None


def encode(audio: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    # 16-bit PCM plays everywhere; the models' own output has far less dynamic range than that.
    sf.write(buffer, np.clip(audio, -1.0, 1.0), sample_rate, format=fmt.upper(), subtype="PCM_16")
    return buffer.getvalue()


def inline_size_bound(num_clips: int, duration_s: float, sample_rate: int) -> int:
    """Upper bound of the base64 text for ``num_clips`` 16-bit clips (FLAC is never larger)."""
    wav_bytes = 44 + int(duration_s * sample_rate) * 2
    return num_clips * (wav_bytes + 2) * 4 // 3


def check_inline_fits(num_clips: int, duration_s: float, sample_rate: int, limit: int) -> None:
    size = inline_size_bound(num_clips, duration_s, sample_rate)
    if size > limit:
        raise JobError(
            f"{num_clips} clip(s) of {duration_s:g} s would be {size / 1e6:.1f} MB inline, above the "
            f"{limit / 1e6:.1f} MB response limit; set output.uri to an s3:// bucket (or pass s3Config), "
            "or ask for fewer or shorter clips"
        )


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
