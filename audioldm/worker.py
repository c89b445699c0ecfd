"""One worker process: settings, warm models, and turning a RunPod job into a result.

Every outcome is a dict RunPod understands: the result, or ``{"error": message}`` with a
message fit for the caller (validation problems listed by field, storage and model problems
in plain words, never a secret, never a raw traceback; the traceback goes to the log).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import torch
from pydantic import ValidationError

from audioldm import redact
from audioldm.context import JobContext
from audioldm.contract import GenerateJob, describe_validation_error, parse_job
from audioldm.errors import JobError
from audioldm.generate_job import run_generate
from audioldm.models import ModelCache, resolve_model
from audioldm.settings import Settings
from audioldm.storage import S3Credentials, Storage

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.models = ModelCache(settings.device, settings.dtype, settings.max_cached_models)
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

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        job_id = str(job.get("id") or uuid.uuid4())
        s3_config = job.get("s3Config") if isinstance(job.get("s3Config"), dict) else None
        if s3_config:
            redact.register(s3_config.get("accessId"), s3_config.get("accessSecret"))
        try:
            spec = parse_job(job.get("input"))
        except ValidationError as exc:
            return {"error": redact.redact(describe_validation_error(exc))}
        try:
            ctx = self._context(job_id, s3_config)
            result = self._dispatch(ctx, spec)
        except JobError as exc:
            log.warning("job %s failed: %s", job_id, exc)
            return {"error": redact.redact(str(exc))}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            log.exception("job %s ran out of GPU memory", job_id)
            return {"error": "the GPU ran out of memory; ask for fewer prompts or candidates, or shorter audio"}
        except Exception as exc:  # noqa: BLE001 - the caller gets a clear line, the log the traceback
            log.exception("job %s failed unexpectedly", job_id)
            return {"error": redact.redact(f"internal error ({type(exc).__name__}): {exc}")}
        log.info("job %s done in %.1fs", job_id, time.perf_counter() - started)
        return result

    def _dispatch(self, ctx: JobContext, spec: GenerateJob) -> dict[str, Any]:
        return run_generate(ctx, spec)

    def _context(self, job_id: str, s3_config: dict | None) -> JobContext:
        credentials = S3Credentials.from_job(s3_config)
        storage = Storage(credentials, local_roots=self.settings.local_roots)
        bucket = credentials.bucket if credentials else None
        return JobContext(job_id, self.settings, storage, self.models, job_bucket=bucket)
