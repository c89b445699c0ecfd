"""What a running job can reach: its id, its storage, the worker's settings and warm models."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from audioldm import checkpoints
from audioldm.models import LoadedModel, ModelCache, ModelSource, resolve_model
from audioldm.settings import Settings
from audioldm.storage import Storage


@dataclass
class JobContext:
    job_id: str
    settings: Settings
    storage: Storage
    models: ModelCache
    work_dir: Path  # this job's scratch directory, removed when the job ends
    job_bucket: str | None = None  # the bucket named in the request's s3Config, if any
    # Called with small dicts (step, loss, ETA...); RunPod shows the latest in /status.
    progress: Callable[[dict[str, Any]], None] = lambda update: None
    # Set when the job is cancelled: long jobs save what they have and return.
    stop: threading.Event = field(default_factory=threading.Event)

    def default_source(self) -> ModelSource:
        # The operator's DEFAULT_MODEL may be any local path; a job's may not.
        return resolve_model(self.settings.default_model, self.settings, trusted=True)

    def load_model(self, ref: str | None) -> tuple[LoadedModel, float]:
        """The warm model a job names (preset, directory or fine-tuned checkpoint) and its load seconds."""
        if ref is None:
            return self.models.get(self.default_source())
        if not _is_checkpoint(ref):
            return self.models.get(resolve_model(ref, self.settings))
        uri = checkpoints.resolve_checkpoint(self.storage, ref)
        folder, manifest = checkpoints.download_checkpoint(self.storage, uri, self.settings.checkpoint_cache_dir)
        # The manifest is user data: its base model gets no more trust than a job's own "model".
        trusted = manifest.base_model == self.settings.default_model
        base = resolve_model(manifest.base_model, self.settings, trusted=trusted)
        return self.models.get_finetuned(base, ref, folder, manifest)


def _is_checkpoint(ref: str) -> bool:
    if ref.startswith("s3://"):
        return True
    path = Path(ref.removeprefix("file://")).expanduser()
    return (path / checkpoints.MANIFEST).is_file() or (path / "checkpoints").is_dir()
