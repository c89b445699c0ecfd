"""What a running job can reach: its id, its storage, the worker's settings and warm models."""

from __future__ import annotations

from dataclasses import dataclass

from audioldm.models import ModelCache, ModelSource, resolve_model
from audioldm.settings import Settings
from audioldm.storage import Storage


@dataclass
class JobContext:
    job_id: str
    settings: Settings
    storage: Storage
    models: ModelCache
    job_bucket: str | None = None  # the bucket named in the request's s3Config, if any

    def default_source(self) -> ModelSource:
        # The operator's DEFAULT_MODEL may be any local path; a job's may not.
        return resolve_model(self.settings.default_model, self.settings, trusted=True)
