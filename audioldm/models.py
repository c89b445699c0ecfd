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
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import AudioLDM2Pipeline, AudioLDM2UNet2DConditionModel, DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from audioldm import adapters
from audioldm.checkpoints import Manifest, load_tensors
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
    adapter: str | None = None  # the LoRA adapter (on the shared base UNet) this model means

    def prepare(self, scheduler: str) -> None:
        """Set this model's scheduler and adapter on the (possibly shared) pipeline."""
        self.pipe.scheduler = self.schedulers[scheduler]
        if self.adapter is not None or adapters.adapter_names(self.pipe.unet):
            adapters.activate(self.pipe.unet, self.adapter)


def _schedulers(pipe: AudioLDM2Pipeline) -> dict[str, SchedulerMixin]:
    # Both built once from the checkpoint's own noise schedule; swapping is free per job.
    return {
        "ddim": DDIMScheduler.from_config(pipe.scheduler.config),
        "dpmpp": DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++"),
    }


class ModelCache:
    """Warm pipelines, least recently used evicted beyond their capacities.

    Base models are keyed by directory. Fine-tuned checkpoints ride on a warm base: a LoRA
    adapter is injected into the base UNet (no reload), a full fine-tune gets its own UNet
    beside the base's other components.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, capacity: int = 1, finetuned_capacity: int = 8):
        self.device, self.dtype = device, dtype
        self.capacity, self.finetuned_capacity = max(1, capacity), max(1, finetuned_capacity)
        self._models: OrderedDict[Path, LoadedModel] = OrderedDict()
        self._finetuned: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.RLock()
        self.loads = 0  # how many times weights were read from disk in this process

    def get(self, source: ModelSource) -> tuple[LoadedModel, float]:
        """The warm pipeline for ``source`` and the seconds spent loading it now (0.0 when warm)."""
        key = source.path.resolve()
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key], 0.0
            while len(self._models) >= self.capacity:
                self._evict_base()
            start = time.perf_counter()
            pipe = load_pipeline(key, self.device, self.dtype)
            model = LoadedModel(source, pipe, _schedulers(pipe))
            self._models[key] = model
            self.loads += 1
            seconds = time.perf_counter() - start
            log.info("loaded model %s from %s in %.1fs", source.name, key, seconds)
            return model, seconds

    def get_finetuned(self, base_source: ModelSource, name: str, folder: Path,
                      manifest: Manifest) -> tuple[LoadedModel, float]:
        """A fine-tuned checkpoint (downloaded to ``folder``) on its warm base model."""
        key = folder.resolve().name  # the download cache names folders by manifest digest
        with self._lock:
            base, seconds = self.get(base_source)
            if key in self._finetuned and self._finetuned[key].pipe.vae is base.pipe.vae:
                self._finetuned.move_to_end(key)
                # The same bytes may sit at another URI: report the name this job used.
                return replace(self._finetuned[key], source=ModelSource(name, base_source.path)), seconds
            start = time.perf_counter()
            while len(self._finetuned) >= self.finetuned_capacity:
                self._evict_finetuned()
            source = ModelSource(name, base_source.path)
            if manifest.method == "lora":
                model = self._with_adapter(base, source, f"ckpt_{key[:16]}", folder, manifest)
            else:
                model = self._with_unet(base, source, folder)
            self._finetuned[key] = model
            return model, seconds + time.perf_counter() - start

    def _with_adapter(self, base: LoadedModel, source: ModelSource, adapter: str, folder: Path,
                      manifest: Manifest) -> LoadedModel:
        lora = manifest.lora or {}
        weights = load_tensors(folder / "adapter.safetensors")
        if adapter not in adapters.adapter_names(base.pipe.unet):
            config = adapters.lora_config(int(lora.get("rank", 8)), float(lora.get("alpha", 8)))
            adapters.load_adapter(base.pipe.unet, adapter, config, weights)
        return LoadedModel(source, base.pipe, base.schedulers, adapter=adapter)

    def _with_unet(self, base: LoadedModel, source: ModelSource, folder: Path) -> LoadedModel:
        unet = AudioLDM2UNet2DConditionModel.from_config(base.pipe.unet.config)
        try:
            unet.load_state_dict(load_tensors(folder / "unet.safetensors"))
        except RuntimeError as exc:
            raise ModelError(f"checkpoint {source.name} does not fit its base model's UNet: "
                             f"{str(exc).splitlines()[0]}") from None
        unet.to(self.device, self.dtype).eval()
        pipe = AudioLDM2Pipeline(**{**base.pipe.components, "unet": unet})
        pipe.set_progress_bar_config(disable=True)
        return LoadedModel(source, pipe, _schedulers(pipe))

    def _evict_base(self) -> None:
        _, evicted = self._models.popitem(last=False)
        log.info("evicting model %s", evicted.source.name)
        # Fine-tunes riding on the evicted base go with it.
        for key in [key for key, model in self._finetuned.items() if model.pipe.vae is evicted.pipe.vae]:
            del self._finetuned[key]
        del evicted
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _evict_finetuned(self) -> None:
        _, evicted = self._finetuned.popitem(last=False)
        log.info("evicting fine-tuned model %s", evicted.source.name)
        if evicted.adapter is not None:
            adapters.remove_adapter(evicted.pipe.unet, evicted.adapter)
