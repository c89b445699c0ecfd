"""Which weights a job means, where they are on disk, and the warm pipelines kept in memory.

A job names a model as a preset (``configs/<name>.json``) or a local directory. Preset weights
are looked up, in order, in: the MODEL_SEARCH_DIRS (e.g. a RunPod network volume), the Hugging
Face cache (baked into the image), RunPod's cached-model volume, and last a download when the
network allows. Loading is the expensive part (seconds to a minute for 8 GB), so loaded
pipelines stay in memory and later jobs reuse them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AudioLDM2Pipeline, DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from audioldm.errors import ModelError
from audioldm.loading import load_pipeline
from audioldm.paths import resolve_inside
from audioldm.settings import Settings
from audioldm.tiny import ensure_tiny

log = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
RUNPOD_HF_CACHE = Path("/runpod-volume/huggingface-cache/hub")


def presets() -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(CONFIGS_DIR.glob("*.json"))}


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the caller asked for, as reported back in results
    path: Path  # a directory in diffusers' layout (model_index.json + component folders)


def resolve_model(ref: str, settings: Settings, trusted: bool = False) -> ModelSource:
    """Map a job's ``model`` to a directory on disk.

    ``trusted`` is for the operator's own DEFAULT_MODEL, which may be any local path; a
    job's local path must lie inside the worker's LOCAL_STORAGE_ROOTS.
    """
    known = presets()
    if ref in known:
        preset = known[ref]
        if preset.get("builtin") == "tiny":
            return ModelSource(ref, ensure_tiny())
        return ModelSource(ref, find_snapshot(preset["repo_id"], settings.model_search_dirs))
    if "://" in ref and not ref.startswith("file://"):
        raise ModelError(f"model {ref!r}: remote model URIs are not supported; use a preset ({', '.join(known)}) "
                         "or a local directory")
    if "/" not in ref and not ref.startswith(("~", ".")):
        raise ModelError(f"model {ref!r} is not a preset (one of: {', '.join(known)}); "
                         "a local model directory must be given as a path")
    path = Path(ref.removeprefix("file://")).expanduser()
    if not trusted:
        path = resolve_inside(path, settings.local_roots, what="model directory")
    if not (path / "model_index.json").is_file():
        raise ModelError(f"model {ref!r} is neither a preset ({', '.join(known)}) nor a directory "
                         "holding an AudioLDM2 pipeline (model_index.json)")
    return ModelSource(ref, path)


def find_snapshot(repo_id: str, search_dirs: list[Path]) -> Path:
    from huggingface_hub import snapshot_download

    tried: list[str] = []
    org, _, name = repo_id.partition("/")
    for base in search_dirs:
        for candidate in (base / repo_id, base / f"{org}--{name}", base / name):
            if (candidate / "model_index.json").is_file():
                return candidate
        tried.append(str(base))
    for cache_dir in (None, RUNPOD_HF_CACHE):  # None: HF_HUB_CACHE / HF_HOME, as baked into the image
        try:
            return Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
        except Exception:  # noqa: BLE001 - any miss here just means "not in this cache"
            tried.append(f"Hugging Face cache {cache_dir or os.environ.get('HF_HUB_CACHE', 'default')}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelError(f"weights for {repo_id} not found (looked in: {'; '.join(tried)}) and HF_HUB_OFFLINE is set")
    try:
        log.info("downloading %s (not found locally)", repo_id)
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # noqa: BLE001 - report the cause class only; hub errors can be long
        raise ModelError(f"weights for {repo_id} not found (looked in: {'; '.join(tried)}) and the download "
                         f"failed ({type(exc).__name__})") from None


@dataclass
class LoadedModel:
    source: ModelSource
    pipe: AudioLDM2Pipeline
    schedulers: dict[str, SchedulerMixin] = field(default_factory=dict)

    def use_scheduler(self, name: str) -> None:
        self.pipe.scheduler = self.schedulers[name]


def _schedulers(pipe: AudioLDM2Pipeline) -> dict[str, SchedulerMixin]:
    # Both built once from the checkpoint's own noise schedule; swapping is free per job.
    return {
        "ddim": DDIMScheduler.from_config(pipe.scheduler.config),
        "dpmpp": DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++"),
    }


class ModelCache:
    """Loaded pipelines by directory, least recently used evicted beyond ``capacity``."""

    def __init__(self, device: torch.device, dtype: torch.dtype, capacity: int = 1):
        self.device, self.dtype, self.capacity = device, dtype, max(1, capacity)
        self._models: OrderedDict[Path, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # how many times weights were read from disk in this process

    def get(self, source: ModelSource) -> tuple[LoadedModel, float]:
        """The warm pipeline for ``source`` and the seconds spent loading it now (0.0 when warm)."""
        key = source.path.resolve()
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key], 0.0
            while len(self._models) >= self.capacity:
                _, evicted = self._models.popitem(last=False)
                log.info("evicting model %s", evicted.source.name)
                del evicted
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            start = time.perf_counter()
            pipe = load_pipeline(key, self.device, self.dtype)
            model = LoadedModel(source, pipe, _schedulers(pipe))
            self._models[key] = model
            self.loads += 1
            seconds = time.perf_counter() - start
            log.info("loaded model %s from %s in %.1fs", source.name, key, seconds)
            return model, seconds
