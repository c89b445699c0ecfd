"""Worker settings, read once from the environment (RunPod endpoint env vars)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch


def _paths(value: str) -> list[Path]:
    return [Path(part).expanduser() for part in value.split(os.pathsep) if part.strip()]


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if not name:
        # fp16 halves memory and roughly doubles speed on GPUs; CPUs are slow or wrong in fp16.
        return torch.float16 if device.type == "cuda" else torch.float32
    dtypes = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"TORCH_DTYPE={name!r} is not one of {sorted(dtypes)}")
    return dtypes[name]


@dataclass(frozen=True)
class Settings:
    default_model: str = "audioldm2"
    # Where results go when a job names no output: "s3://bucket/prefix/" or a local directory.
    output_uri: str | None = None
    # Local paths a job may read from or write to; everything else is refused.
    local_roots: list[Path] = field(default_factory=lambda: [Path("outputs").resolve(), Path("/runpod-volume")])
    # Extra places to look for a preset's weights before the Hugging Face caches.
    model_search_dirs: list[Path] = field(default_factory=lambda: [Path("/runpod-volume/models")])
    # Base64 results above this fail with a clear error (RunPod caps response bodies).
    inline_max_bytes: int = 8 * 1024 * 1024
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    max_cached_models: int = 1
    max_cached_adapters: int = 8
    # Per-job scratch space (datasets, checkpoints on their way up); removed after each job.
    work_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "audioldm2-jobs")
    # Fine-tuned checkpoints downloaded for generate jobs, kept across jobs.
    checkpoint_cache_dir: Path = field(
        default_factory=lambda: Path("~/.cache/audioldm2-worker/checkpoints").expanduser())
    # A fine-tune saves and returns before this unless the job says otherwise: RunPod's
    # default execution timeout is 600 s.
    finetune_max_runtime_s: float = 540.0
    max_dataset_bytes: int = 8 * 1024**3

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        device = torch.device(env.get("DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
        defaults = cls()
        return cls(
            default_model=env.get("DEFAULT_MODEL") or defaults.default_model,
            output_uri=env.get("OUTPUT_URI") or None,
            local_roots=_paths(env["LOCAL_STORAGE_ROOTS"]) if "LOCAL_STORAGE_ROOTS" in env else defaults.local_roots,
            model_search_dirs=_paths(env.get("MODEL_SEARCH_DIRS", "")) or defaults.model_search_dirs,
            inline_max_bytes=int(env.get("INLINE_MAX_BYTES") or defaults.inline_max_bytes),
            device=device,
            dtype=_dtype(env.get("TORCH_DTYPE", "").lower(), device),
            max_cached_models=int(env.get("MAX_CACHED_MODELS") or defaults.max_cached_models),
            max_cached_adapters=int(env.get("MAX_CACHED_ADAPTERS") or defaults.max_cached_adapters),
            work_dir=Path(env["WORK_DIR"]) if env.get("WORK_DIR") else defaults.work_dir,
            checkpoint_cache_dir=Path(env["CHECKPOINT_CACHE_DIR"]) if env.get("CHECKPOINT_CACHE_DIR")
            else defaults.checkpoint_cache_dir,
            finetune_max_runtime_s=float(env.get("FINETUNE_MAX_RUNTIME_S") or defaults.finetune_max_runtime_s),
            max_dataset_bytes=int(env.get("MAX_DATASET_BYTES") or defaults.max_dataset_bytes),
        )
