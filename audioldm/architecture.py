"""The full-size AudioLDM2 architecture with RANDOM weights, built offline from published configs.

The real weights cannot be downloaded where this worker is developed and benchmarked, yet speed and
memory depend only on the architecture (shapes, layer counts), not on the weight values. This module
builds a pipeline with cvssp/audioldm2's exact component shapes from the per-component JSON configs in
``configs/architectures/<preset>/`` (their provenance is in the README.md beside them) and saves it in
the hub layout, so ``audioldm.loading.load_pipeline`` and the worker load it like the real checkpoint.

What differs from the real checkpoint, on purpose:
- weights are random (it makes noise, not sound);
- the tokenizers are the small offline ones of ``audioldm.tiny`` (the real vocabularies cannot be had);
  token ids stay inside the real vocabularies, and the CLAP tokenizer pads to the same fixed length, so
  compute is the same. Only the T5 prompt length (padding="longest") may differ by a few tokens.

Usage:
    python -m audioldm.architecture DIR [--preset audioldm2]   # build into DIR (4.2 GB of fp32 safetensors)
    python -m audioldm.architecture --count [--preset audioldm2]  # parameter counts only (meta device, fast)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AudioLDM2Pipeline,
    AudioLDM2ProjectionModel,
    AudioLDM2UNet2DConditionModel,
    AutoencoderKL,
    DDIMScheduler,
)
from transformers import (
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    GPT2Config,
    GPT2Model,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
    T5Config,
    T5EncoderModel,
)

from audioldm import tiny
from audioldm.errors import ModelError

ARCHITECTURES_DIR = Path(__file__).resolve().parent.parent / "configs" / "architectures"

# Bump when the built model changes, so caches built by an older version are not reused.
FULL_SIZE_VERSION = "full-random-v1"

SEED = 0

# Published parameter counts (see configs/architectures/audioldm2/README.md for sources).
PUBLISHED_PARAMS: dict[str, dict[str, float]] = {
    "audioldm2": {
        "unet": 347e6,  # model card: "350M"; FACTS.md: 347 M
        "total": 1.12e9,  # model card: "1.1B"; FACTS.md: 1.12 B
        "text_encoder_2": 341e6,  # google/flan-t5-large encoder only (T5EncoderModel)
        "language_model": 124e6,  # "gpt2" (GPT-2 base, 124 M)
    },
}

# Components built from a model config (the rest are the scheduler, feature extractor and tokenizers).
MODEL_COMPONENTS = (
    "unet", "vae", "text_encoder", "text_encoder_2", "language_model", "projection_model", "vocoder",
)

NOTE = """\
Full-size AudioLDM2 architecture ({preset}) with RANDOM weights, built offline by
audioldm/architecture.py ({version}) from configs/architectures/{preset}/.
It makes noise, not sound. It exists to measure speed and memory at the real model's size
without downloading the checkpoint. Tokenizers are the small offline ones of audioldm/tiny.py.
"""


def config_dir(preset: str | Path = "audioldm2") -> Path:
    """The folder of `preset`'s component configs: a name under configs/architectures/, or a folder path."""
    if isinstance(preset, Path) or os.sep in preset:
        path = Path(preset)
        if not (path / "unet.json").is_file():
            raise ModelError(f"{path} holds no architecture configs (unet.json missing)")
        return path
    path = ARCHITECTURES_DIR / preset
    if not path.is_dir():
        known = sorted(p.name for p in ARCHITECTURES_DIR.iterdir() if p.is_dir()) if ARCHITECTURES_DIR.is_dir() else []
        raise ModelError(f"no architecture preset {preset!r} (have: {', '.join(known)})")
    return path


def load_configs(preset: str | Path = "audioldm2") -> dict[str, dict[str, Any]]:
    """Every component's JSON config of `preset`, keyed by component name."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(config_dir(preset).glob("*.json"))}


def _kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """A config without its bookkeeping keys ("_class_name", ...)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def build_models(configs: dict[str, dict[str, Any]]) -> dict[str, torch.nn.Module]:
    """The seven weight-holding components, freshly initialised (call under `torch.device("meta")` to count).

    Each component is seeded on its own, so a build is reproducible whatever is built before it.
    """
    builders = {
        "unet": lambda c: AudioLDM2UNet2DConditionModel.from_config(c),
        "vae": lambda c: AutoencoderKL.from_config(c),
        "text_encoder": lambda c: ClapModel(ClapConfig(**_kwargs(c))),
        "text_encoder_2": lambda c: T5EncoderModel(T5Config(**_kwargs(c))),
        "language_model": _gpt2,
        "projection_model": lambda c: AudioLDM2ProjectionModel.from_config(c),
        "vocoder": lambda c: SpeechT5HifiGan(SpeechT5HifiGanConfig(**_kwargs(c))),
    }
    models = {}
    for index, name in enumerate(MODEL_COMPONENTS):
        torch.manual_seed(SEED + index)
        models[name] = builders[name](configs[name]).eval()
    return models


def _gpt2(config: dict[str, Any]) -> GPT2Model:
    kwargs = _kwargs(config)
    max_new_tokens = kwargs.pop("max_new_tokens", 8)
    model = GPT2Model(GPT2Config(**kwargs))
    # The hub config carries it; the pipeline reads it as its default number of generated states.
    model.config.max_new_tokens = max_new_tokens
    return model


def parameter_counts(preset: str | Path = "audioldm2") -> dict[str, int]:
    """Parameters per component and in total, counted on the meta device (no memory, ~1 s)."""
    configs = load_configs(preset)
    with torch.device("meta"):
        models = build_models(configs)
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    counts["total"] = sum(counts.values())
    return counts


def build_pipeline(preset: str | Path = "audioldm2") -> AudioLDM2Pipeline:
    configs = load_configs(preset)
    models = build_models(configs)
    tokenizer = tiny._roberta_tokenizer()
    tokenizer.model_max_length = configs["tokenizer"]["model_max_length"]
    tokenizer_2 = tiny._t5_tokenizer()
    tokenizer_2.model_max_length = configs["tokenizer_2"]["model_max_length"]
    vocab = configs["text_encoder"]["text_config"]["vocab_size"], configs["text_encoder_2"]["vocab_size"]
    if len(tokenizer) > vocab[0] or len(tokenizer_2) > vocab[1]:
        raise ModelError("offline tokenizers produce ids outside the model's vocabularies")
    return AudioLDM2Pipeline(
        **models,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        feature_extractor=ClapFeatureExtractor(**_kwargs(configs["feature_extractor"])),
        scheduler=DDIMScheduler.from_config(configs["scheduler"]),
    )


def build_full_size(path: Path, preset: str | Path = "audioldm2") -> Path:
    """Build the random-weight full-size pipeline and save it into `path` in the hub layout. Returns `path`.

    `preset` names a folder under configs/architectures/ or is a folder of component configs. For audioldm2
    this takes ~30 s on 2 CPU cores, ~5.3 GB of RAM at peak and 4.2 GB of disk.
    """
    path = Path(path)
    pipe = build_pipeline(preset)
    pipe.save_pretrained(path, safe_serialization=True)
    del pipe
    tiny._declare_gpt2_model(path)  # as on the hub, so the loader's GPT2LMHeadModel fix is exercised
    (path / "FULL_SIZE_MODEL.txt").write_text(NOTE.format(preset=Path(preset).name, version=FULL_SIZE_VERSION))
    return path


def default_cache_dir(preset: str = "audioldm2") -> Path:
    env = os.environ.get("AUDIOLDM_FULL_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "audioldm2-worker" / f"{FULL_SIZE_VERSION}-{preset}"


def ensure_full_size(cache_dir: Path | None = None, preset: str = "audioldm2") -> Path:
    """The full-size random model's directory, built on first use (staged, then renamed into place)."""
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir(preset)
    return tiny.build_once(target, lambda staging: build_full_size(staging, preset), "model")


def format_counts(counts: dict[str, int], preset: str = "audioldm2") -> str:
    published = PUBLISHED_PARAMS.get(preset, {})
    lines = [f"{'component':<18}{'built':>16}{'published':>12}{'diff':>9}"]
    for name, count in counts.items():
        ref = published.get(name)
        diff = f"{100 * (count / ref - 1):+.1f} %" if ref else ""
        lines.append(f"{name:<18}{count:>16,}{(f'{ref / 1e6:,.0f} M' if ref else '-'):>12}{diff:>9}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Build the full-size AudioLDM2 architecture with random weights.")
    parser.add_argument("dir", nargs="?", type=Path, help="where to save the pipeline (hub layout)")
    parser.add_argument("--preset", default="audioldm2")
    parser.add_argument("--count", action="store_true", help="only print parameter counts (meta device)")
    args = parser.parse_args(argv)
    print(format_counts(parameter_counts(args.preset), args.preset))
    if args.count:
        return 0
    if args.dir is None:
        parser.error("DIR is required unless --count")
    start = time.perf_counter()
    build_full_size(args.dir, args.preset)
    print(f"built {args.dir} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
