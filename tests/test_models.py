"""Where a job's model comes from: presets in caches and volumes, local directories, refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants

from audioldm import models
from audioldm.errors import JobError, ModelError
from audioldm.fetch_weights import files_to_fetch
from audioldm.models import ModelCache, resolve_model
from audioldm.settings import Settings


def hub_cache_with(tiny_model_dir: Path, cache: Path, repo_id: str = "cvssp/audioldm2") -> Path:
    """Lay the tiny model out as huggingface_hub stores a download: refs/main -> snapshots/<rev>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return snapshot


def settings_for(tmp_path: Path, **overrides) -> Settings:
    return Settings(local_roots=[tmp_path / "roots"], model_search_dirs=[tmp_path / "volume"], **overrides)


def test_preset_found_in_the_hugging_face_cache_loads_and_generates(tiny_model_dir, tmp_path, monkeypatch):
    snapshot = hub_cache_with(tiny_model_dir, tmp_path / "hub")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    source = resolve_model("audioldm2", settings_for(tmp_path))

    assert source.path == snapshot
    model, seconds = ModelCache(torch.device("cpu"), torch.float32).get(source)
    audio = model.pipe("rain", num_inference_steps=2, audio_length_in_s=1.0, output_type="np").audios
    assert seconds > 0 and audio.shape == (1, 16000)


def test_preset_found_in_runpods_model_cache(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(models, "RUNPOD_HF_CACHE", tmp_path / "runpod-cache")
    snapshot = hub_cache_with(tiny_model_dir, tmp_path / "runpod-cache", "cvssp/audioldm2-music")

    assert resolve_model("audioldm2-music", settings_for(tmp_path)).path == snapshot


def test_preset_found_on_a_network_volume_first(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "volume" / "cvssp--audioldm2-large")
    source = resolve_model("audioldm2-large", settings_for(tmp_path))
    assert source.path == tmp_path / "volume" / "cvssp--audioldm2-large"


def test_missing_weights_offline_say_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(models, "RUNPOD_HF_CACHE", tmp_path / "no-runpod-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as info:
        resolve_model("audioldm2", settings_for(tmp_path))
    assert "cvssp/audioldm2" in str(info.value) and str(tmp_path / "volume") in str(info.value)
    assert "HF_HUB_OFFLINE" in str(info.value)


def test_local_model_directories_must_be_inside_the_roots(tiny_model_dir, tmp_path):
    inside = tmp_path / "roots" / "my-model"
    shutil.copytree(tiny_model_dir, inside)
    settings = settings_for(tmp_path)

    assert resolve_model(str(inside), settings).path == inside
    with pytest.raises(JobError, match="outside the allowed local roots"):
        resolve_model(str(tiny_model_dir), settings)
    with pytest.raises(JobError, match="outside the allowed local roots"):
        resolve_model(str(inside / ".." / ".." / "elsewhere"), settings)
    # The operator's own DEFAULT_MODEL is trusted wherever it lies.
    assert resolve_model(str(tiny_model_dir), settings, trusted=True).path == tiny_model_dir


def test_a_directory_that_is_not_a_pipeline_is_refused(tmp_path):
    (tmp_path / "roots" / "junk").mkdir(parents=True)
    with pytest.raises(ModelError, match="model_index.json"):
        resolve_model(str(tmp_path / "roots" / "junk"), settings_for(tmp_path))


def test_remote_model_uris_are_refused_clearly(tmp_path):
    with pytest.raises(ModelError, match="not supported"):
        resolve_model("https://example.com/model.ckpt", settings_for(tmp_path))


def test_model_cache_evicts_beyond_capacity(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    cache = ModelCache(torch.device("cpu"), torch.float32, capacity=1)
    first, _ = cache.get(models.ModelSource("a", tiny_model_dir))
    cache.get(models.ModelSource("b", copy))
    again, seconds = cache.get(models.ModelSource("a", tiny_model_dir))
    assert cache.loads == 3 and seconds > 0 and again is not first


def test_image_build_fetches_safetensors_only_where_a_folder_has_them():
    repo = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.safetensors", "vocoder/config.json", "vocoder/pytorch_model.bin",
            "tokenizer/vocab.json", "README.md"]
    assert files_to_fetch(repo) == ["README.md", "model_index.json", "tokenizer/vocab.json", "unet/config.json",
                                    "unet/diffusion_pytorch_model.safetensors", "vocoder/config.json",
                                    "vocoder/pytorch_model.bin"]
