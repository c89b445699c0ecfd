"""One worker process: settings, warm models, and turning a RunPod job into a result.

Every outcome is a dict RunPod understands: the result, or ``{"error": message}`` with a
message fit for the caller (validation problems listed by field, storage and model problems
in plain words, never a secret, never a raw traceback; the traceback goes to the log).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import ValidationError

from audioldm import redact
from audioldm.context import JobContext
from audioldm.contract import FinetuneJob, GenerateJob, describe_validation_error, parse_job
from audioldm.errors import JobError
from audioldm.finetune_job import run_finetune
from audioldm.generate_job import run_generate
from audioldm.models import ModelCache, resolve_model
from audioldm.outputs import safe_job_id
from audioldm.settings import Settings
from audioldm.storage import S3Credentials, Storage

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


class Worker:
    def __init__(self, settings: Settings):
        self.settings = settings
        # One job at a time: jobs share the warm pipeline (its scheduler, its active adapter).
        # RunPod sends one job per worker anyway; the SDK's local API server does not.
        self._job_lock = threading.Lock()
        self.models = ModelCache(settings.device, settings.dtype, settings.max_cached_models,
                                 settings.max_cached_adapters)
        redact.register_env()

    @classmethod
    def from_env(cls) -> Worker:
        return cls(Settings.from_env())

    def warm_up(self) -> None:
        """Load the default model now, so the first job does not pay for it."""
        try:
            source = resolve_model(self.settings.default_model, self.settings, trusted=True)
            _, seconds = self.models.get(source)
            log.info("default model %s ready in %.1fs", self.settings.default_model, seconds)
        except JobError as exc:
            # Stay up: jobs naming another model can still run, and each job reports the problem.
            log.error("default model %s not loaded: %s", self.settings.default_model, exc)

    async def run_async(self, job: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
        """``run`` in a thread; on cancel, ask the job to save and stop, wait for it, re-raise."""
        stop = threading.Event()
        task = asyncio.ensure_future(asyncio.to_thread(self.run, job, progress, stop))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            log.warning("job %s cancelled: stopping after a checkpoint", job.get("id"))
            stop.set()
            await task
            raise

    def run(self, job: dict[str, Any], progress: Progress | None = None,
            stop: threading.Event | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        job_id = str(job.get("id") or uuid.uuid4()) if isinstance(job, dict) else str(uuid.uuid4())
        s3_config = job.get("s3Config") if isinstance(job, dict) and isinstance(job.get("s3Config"), dict) else None
        if s3_config:
            redact.register(s3_config.get("accessId"), s3_config.get("accessSecret"))
        try:
            spec = parse_job(job.get("input") if isinstance(job, dict) else None)
        except ValidationError as exc:
            return {"error": redact.redact(describe_validation_error(exc))}
        work_dir = None
        try:
            self.settings.work_dir.mkdir(parents=True, exist_ok=True)
            work_dir = tempfile.mkdtemp(prefix=f"{safe_job_id(job_id)}-", dir=self.settings.work_dir)
            ctx = self._context(job_id, s3_config, work_dir, progress, stop)
            with self._job_lock:
                result = self._dispatch(ctx, spec)
        except JobError as exc:
            log.warning("job %s failed: %s", job_id, exc)
            return {"error": redact.redact(str(exc))}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            log.exception("job %s ran out of GPU memory", job_id)
            return {"error": "the GPU ran out of memory; use fewer prompts or candidates, shorter audio, "
                             "a smaller batch_size or gradient_checkpointing"}
        except Exception as exc:  # noqa: BLE001 - the caller gets a clear line, the log the traceback
            log.exception("job %s failed unexpectedly", job_id)
            return {"error": redact.redact(f"internal error ({type(exc).__name__}): {exc}")}
        finally:
            if work_dir:
                shutil.rmtree(work_dir, ignore_errors=True)
        log.info("job %s done in %.1fs", job_id, time.perf_counter() - started)
        return result

    def _dispatch(self, ctx: JobContext, spec: GenerateJob | FinetuneJob) -> dict[str, Any]:
        if isinstance(spec, FinetuneJob):
            return run_finetune(ctx, spec)
        return run_generate(ctx, spec)

    def _context(self, job_id: str, s3_config: dict | None, work_dir: str, progress: Progress | None,
                 stop: threading.Event | None) -> JobContext:
        credentials = S3Credentials.from_job(s3_config)
        storage = Storage(credentials, local_roots=self.settings.local_roots)
        ctx = JobContext(job_id, self.settings, storage, self.models, Path(work_dir),
                         job_bucket=credentials.bucket if credentials else None)
        if progress is not None:
            ctx.progress = progress
        if stop is not None:
            ctx.stop = stop
        return ctx
