"""Text to audio on a warm pipeline: the sampling half of a generate job.

Read top to bottom: seed a generator per prompt, run the diffusers pipeline once for every
prompt x candidate, score each waveform against its prompt with CLAP, keep the best.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from audioldm.clap import clap_scores
from audioldm.contract import GenerateJob
from audioldm.models import LoadedModel


@dataclass
class Clip:
    prompt: str
    seed: int
    audio: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int
    clap_score: float


def generators_for(seed: int, num_prompts: int, candidates: int) -> list[torch.Generator]:
    """One CPU generator per prompt, shared by its candidates.

    diffusers draws each batch element's noise from its own list entry, in order, so prompt i
    sees the same noise whether it is sent alone with ``seed + i`` or inside a batch. CPU
    generators make the noise identical on CPU and GPU.
    """
    generators = []
    for index in range(num_prompts):
        generator = torch.Generator("cpu").manual_seed(seed + index)
        generators.extend([generator] * candidates)
    return generators


@torch.inference_mode()
def generate(model: LoadedModel, job: GenerateJob) -> list[Clip]:
    pipe = model.pipe
    model.prepare(job.scheduler)
    prompts = job.prompts
    # Candidates are spelled out as repeated prompts (rather than num_waveforms_per_prompt)
    # so that the pipeline does not re-rank on its own and discard the scores.
    expanded = [prompt for prompt in prompts for _ in range(job.candidates)]
    audio = pipe(
        prompt=expanded,
        negative_prompt=[job.negative_prompt] * len(expanded) if job.negative_prompt else None,
        audio_length_in_s=job.duration_s,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance_scale,
        num_waveforms_per_prompt=1,
        generator=generators_for(job.seed, len(prompts), job.candidates),
        output_type="pt",
    ).audios
    scores = clap_scores(pipe, expanded, audio).view(len(prompts), job.candidates)
    best = scores.argmax(dim=1)
    audio = audio.float().clamp(-1.0, 1.0).view(len(prompts), job.candidates, -1)
    sample_rate = pipe.vocoder.config.sampling_rate
    return [
        Clip(prompt, job.seed + index, audio[index, best[index]].numpy(), sample_rate, float(scores[index, best[index]]))
        for index, prompt in enumerate(prompts)
    ]
