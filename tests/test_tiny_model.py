"""The tiny offline AudioLDM2 model and the pipeline loader, exercised for real (no mocks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AudioLDM2Pipeline
from diffusers.utils import is_librosa_available
from transformers import GPT2LMHeadModel, GPT2Model

from audioldm.errors import ModelError
from audioldm.loading import load_pipeline
from audioldm.tiny import build_tiny, ensure_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_deterministic_and_declares_gpt2_model(tiny_dir: Path, tmp_path: Path) -> None:
    first, second = _files(tiny_dir), _files(build_tiny(tmp_path / "again"))
    assert first.keys() == second.keys()
    weights = [name for name in first if name.endswith(".safetensors")]
    assert len(weights) == 7  # vae, text_encoder, text_encoder_2, projection_model, language_model, unet, vocoder
    for name in first:
        assert first[name] == second[name], f"{name} differs between two builds"

    index = json.loads((tiny_dir / "model_index.json").read_text())
    # Declared exactly as on the hub, so the loader's GPT-2 fix is what makes it work.
    assert index["language_model"] == ["transformers", "GPT2Model"]
    assert (tiny_dir / "TINY_MODEL.txt").read_text().startswith("Tiny AudioLDM2 pipeline with RANDOM weights")
    assert sum(len(data) for data in first.values()) < 5_000_000


def test_generate_with_clap_reranking(tiny_dir: Path) -> None:
    # Without librosa the pipeline silently skips re-ranking; this test is about re-ranking.
    assert is_librosa_available()
    pipe = load_pipeline(tiny_dir, device="cpu", dtype=torch.float32)
    # The real model's conventions: 64 mel bins, hop 160 at 16 kHz, VAE scale factor 4, 8 latent channels.
    assert pipe.vocoder.config.model_in_dim == 64
    assert pipe.vocoder.config.sampling_rate == 16_000
    assert int(np.prod(pipe.vocoder.config.upsample_rates)) == 160
    assert pipe.vae_scale_factor == 4
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 8
    assert len(pipe.tokenizer) <= pipe.text_encoder.config.text_config.vocab_size
    assert len(pipe.tokenizer_2) <= pipe.text_encoder_2.config.vocab_size

    output = pipe(
        ["A dog barks", "Ünïcödé 🐶 日本語 rain"],
        num_inference_steps=2,
        audio_length_in_s=1.0,
        num_waveforms_per_prompt=2,
        generator=torch.Generator().manual_seed(0),
    )
    audios = output.audios
    assert audios.shape == (4, 16_000)
    assert np.isfinite(audios).all()


def test_loader_avoids_the_gpt2_trap(tiny_dir: Path) -> None:
    # The trap: a plain load takes model_index.json's GPT2Model, which cannot generate in transformers 5.
    # If this stops failing after an upgrade, the workaround in audioldm.loading may be revisited.
    plain = AudioLDM2Pipeline.from_pretrained(tiny_dir, local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    assert type(plain.language_model) is GPT2Model
    with pytest.raises(AttributeError, match="_update_model_kwargs_for_generation"):
        plain("A dog barks", num_inference_steps=1, audio_length_in_s=1.0)

    pipe = load_pipeline(tiny_dir, device="cpu", dtype=torch.float32)
    assert isinstance(pipe.language_model, GPT2LMHeadModel)
    # Same weights: the LM head is tied to the saved embeddings, nothing is freshly initialised.
    torch.testing.assert_close(pipe.language_model.transformer.wte.weight, plain.language_model.wte.weight)
    assert pipe.language_model.lm_head.weight is pipe.language_model.transformer.wte.weight


def test_missing_model_index_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelError, match="model_index.json is missing"):
        load_pipeline(tmp_path, device="cpu", dtype=torch.float32)
    with pytest.raises(ModelError, match="does not exist"):
        load_pipeline(tmp_path / "nowhere", device="cpu", dtype=torch.float32)


def test_missing_component_is_a_model_error(tiny_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_bytes((tiny_dir / "model_index.json").read_bytes())
    with pytest.raises(ModelError, match="lacks component.*vae.*vocoder"):
        load_pipeline(broken, device="cpu", dtype=torch.float32)


def test_ensure_tiny_builds_once_in_place(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "tiny-v1"
    assert ensure_tiny(target) == target
    stamp = (target / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny(target) == target
    assert (target / "model_index.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in target.parent.iterdir()] == ["tiny-v1"]  # no staging directory left behind


def test_ensure_tiny_leaves_foreign_directories_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelError, match="holds no tiny model"):
        ensure_tiny(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory (e.g. a fresh volume mount) is fine to build into
    assert (ensure_tiny(empty) / "model_index.json").is_file()
