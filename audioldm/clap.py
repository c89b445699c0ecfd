"""CLAP text-audio similarity, used to pick the best of several candidate waveforms.

The pipeline can re-rank by itself, but it throws the scores away and resamples on the CPU
with librosa; we want the scores in the result, so we compute them here with the pipeline's
own CLAP model and feature extractor.
"""

from __future__ import annotations

import torch
import torchaudio
from diffusers import AudioLDM2Pipeline


@torch.no_grad()
def clap_scores(pipe: AudioLDM2Pipeline, prompts: list[str], audio: torch.Tensor) -> torch.Tensor:
    """Cosine similarity in CLAP space between ``prompts[i]`` and ``audio[i]`` (float32, CPU)."""
    device, dtype = pipe.text_encoder.device, pipe.text_encoder.dtype
    source_rate = pipe.vocoder.config.sampling_rate
    target_rate = pipe.feature_extractor.sampling_rate
    resampled = torchaudio.functional.resample(audio.float(), source_rate, target_rate)
    # The extractor crops clips longer than its window at a random offset (numpy's global
    # RNG); crop the start ourselves so that scores, and so the pick, are reproducible.
    resampled = resampled[:, : pipe.feature_extractor.nb_max_samples]
    features = pipe.feature_extractor(
        list(resampled.cpu().numpy()), sampling_rate=target_rate, return_tensors="pt"
    ).input_features
    text = pipe.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    outputs = pipe.text_encoder(
        input_ids=text.input_ids.to(device),
        attention_mask=text.attention_mask.to(device),
        input_features=features.to(device, dtype),
    )
    # Both embeddings come back L2-normalised, so the row-wise dot product is the cosine.
    return (outputs.text_embeds * outputs.audio_embeds).sum(dim=-1).float().cpu()
