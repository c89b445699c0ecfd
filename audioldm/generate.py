"""Text to audio on a warm pipeline: the sampling half of a generate job.

Read top to bottom: seed a generator per prompt, run the diffusers pipeline once for every
prompt x candidate, score each waveform against its prompt with CLAP, keep the best.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AudioLDM2Pipeline

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


@torch.no_grad()
def encode_prompts(pipe: AudioLDM2Pipeline, prompts: list[str], negative_prompt: str | None,
                   guidance_scale: float) -> dict[str, torch.Tensor]:
    """The pipeline's conditioning for ``prompts``, each prompt encoded on its own.

    diffusers encodes a batch together: a short prompt's T5 states get padded to the longest
    one's, and GPT-2 then generates different conditioning from the padded sequence, so a
    prompt's audio would depend on the other prompts of its job. Encoded alone and padded
    afterwards (the padding is masked in the UNet), it does not.
    """
    guided = guidance_scale > 1.0
    encoded = {}
    for prompt in dict.fromkeys(prompts):
        t5, mask, gpt2 = pipe.encode_prompt(
            [prompt], pipe._execution_device, num_waveforms_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=[negative_prompt] if negative_prompt else None)
        encoded[prompt] = (t5, mask, gpt2)  # with guidance: row 0 unconditional, row 1 the prompt
    length = max(t5.shape[1] for t5, _, _ in encoded.values())

    def stacked(row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [encoded[prompt] for prompt in prompts]
        t5 = torch.cat([F.pad(t5[row:row + 1], (0, 0, 0, length - t5.shape[1])) for t5, _, _ in rows])
        mask = torch.cat([F.pad(mask[row:row + 1], (0, length - mask.shape[1])) for _, mask, _ in rows])
        gpt2 = torch.cat([gpt2[row:row + 1] for _, _, gpt2 in rows])
        return t5, mask, gpt2

    t5, mask, gpt2 = stacked(1 if guided else 0)
    kwargs = {"prompt_embeds": t5, "attention_mask": mask, "generated_prompt_embeds": gpt2}
    if guided:
        t5, mask, gpt2 = stacked(0)
        kwargs |= {"negative_prompt_embeds": t5, "negative_attention_mask": mask,
                   "negative_generated_prompt_embeds": gpt2}
    return kwargs


@torch.inference_mode()
def generate(model: LoadedModel, job: GenerateJob) -> list[Clip]:
    pipe = model.pipe
    model.prepare(job.scheduler)
    prompts = job.prompts
    # Candidates are spelled out as repeated prompts (rather than num_waveforms_per_prompt)
    # so that the pipeline does not re-rank on its own and discard the scores.
    expanded = [prompt for prompt in prompts for _ in range(job.candidates)]
    audio = pipe(
        **encode_prompts(pipe, expanded, job.negative_prompt, job.guidance_scale),
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
