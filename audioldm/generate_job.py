"""The generate job: check the destination, sample on the warm model, store, report."""

from __future__ import annotations

import time
from typing import Any

from audioldm.contract import GenerateJob
from audioldm.generate import Clip, generate
from audioldm.storage import join
from audioldm.outputs import CONTENT_TYPES, check_inline_fits, encode, job_destination, slug, to_base64
from audioldm.context import JobContext


def run_generate(ctx: JobContext, job: GenerateJob) -> dict[str, Any]:
    started = time.perf_counter()
    fmt = job.output.format if job.output else "wav"
    destination = job_destination(job.output, ctx.settings, ctx.job_bucket, ctx.job_id)

    # Everything that can fail cheaply fails before the GPU spends a second on the job.
    if destination is None:
        check_inline_fits(len(job.prompts), job.duration_s, 16_000, ctx.settings.inline_max_bytes)
    else:
        ctx.storage.check_writable(destination)
    model, load_s = ctx.load_model(job.model)
    generate_start = time.perf_counter()
    clips = generate(model, job)
    generate_s = time.perf_counter() - generate_start

    upload_start = time.perf_counter()
    outputs = [_store(ctx, clip, index, fmt, destination, job) for index, clip in enumerate(clips)]
    upload_s = time.perf_counter() - upload_start
    return {
        "task": "generate",
        "model": {"name": model.source.name, "loaded_this_job": load_s > 0},
        "outputs": outputs,
        "settings": {
            "steps": job.steps,
            "guidance_scale": job.guidance_scale,
            "candidates": job.candidates,
            "scheduler": job.scheduler,
            "negative_prompt": job.negative_prompt,
        },
        "timings": {
            "load_s": round(load_s, 3),
            "generate_s": round(generate_s, 3),
            "upload_s": round(upload_s, 3),
            "total_s": round(time.perf_counter() - started, 3),
        },
    }


def _store(ctx: JobContext, clip: Clip, index: int, fmt: str, destination: str | None, job: GenerateJob) -> dict:
    data = encode(clip.audio, clip.sample_rate, fmt)
    entry: dict[str, Any] = {
        "index": index,
        "prompt": clip.prompt,
        "seed": clip.seed,
        "clap_score": round(clip.clap_score, 4),
        "duration_s": round(len(clip.audio) / clip.sample_rate, 4),
        "sample_rate": clip.sample_rate,
        "format": fmt,
        "bytes": len(data),
    }
    if destination is None:
        entry["audio_base64"] = to_base64(data)
        return entry
    uri = join(destination, f"{index:03d}-{slug(clip.prompt)}.{fmt}")
    ctx.storage.put_bytes(data, uri, content_type=CONTENT_TYPES[fmt])
    entry["uri"] = uri
    expiry = job.output.url_expiry_s if job.output else 3600
    entry["url"] = ctx.storage.presign(uri, expiry)
    return entry
