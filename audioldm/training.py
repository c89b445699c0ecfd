"""Fine-tuning AudioLDM2's UNet with Lightning: the data stream, the loss, the optimizer.

Read top to bottom: `StepBatches` turns (seed, step) into a batch of log-mels and captions,
`Conditioning` encodes captions with the frozen text stack (cached per caption), and
`UNetFinetune.training_step` is the AudioLDM recipe: VAE latents, scheduler noise at a random
timestep, epsilon or v target, MSE, with the caption dropped 10 % of the time for CFG.

Everything random is drawn from generators seeded by (seed, micro-step), so a run resumed from
a checkpoint at step N sees exactly the batches, crops and noise an uninterrupted run would.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import AudioLDM2Pipeline, DDPMScheduler
from torch.utils.data import IterableDataset

from audioldm.features import load_audio, log_mel, prepare_waveform

CFG_DROP_PROBABILITY = 0.1  # the original recipe's rate of training without the caption


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from several integers (stable across processes)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class Batch:
    mel: torch.Tensor  # (B, 1, 1024, 64) log-mel
    captions: list[str]
    micro_step: int


class StepBatches(IterableDataset):
    """Micro-batches ``start .. stop-1`` of an endless shuffled stream over the dataset."""

    def __init__(self, items: list[tuple[Path, str]], batch_size: int, seed: int, start: int, stop: int):
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[Batch]:
        for micro_step in range(self.start, self.stop):
            indices = [self._index(micro_step * self.batch_size + j) for j in range(self.batch_size)]
            mels, captions = [], []
            for j, index in enumerate(indices):
                path, caption = self.items[index]
                crop = torch.Generator().manual_seed(mix_seed(self.seed, micro_step, j, 1))
                audio, rate = load_audio(path)
                mels.append(log_mel(prepare_waveform(torch.from_numpy(audio), rate, generator=crop)))
                captions.append(caption)
            yield Batch(torch.stack(mels).unsqueeze(1), captions, micro_step)

    def _index(self, position: int) -> int:
        # Each epoch is its own permutation, so position -> item needs no state to resume.
        epoch, offset = divmod(position, len(self.items))
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 2))
        return int(torch.randperm(len(self.items), generator=generator)[offset])


class Conditioning:
    """Caption -> (T5 states, T5 mask, GPT-2 states) from the frozen pipeline, cached on the CPU.

    Each caption is encoded alone, so its embedding never depends on what else is in the batch.
    """

    def __init__(self, pipe: AudioLDM2Pipeline):
        self.pipe = pipe
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, ...]:
        for caption in set(captions) - self.cache.keys():
            t5, mask, gpt2 = self.pipe.encode_prompt(
                [caption], self.pipe.device, num_waveforms_per_prompt=1, do_classifier_free_guidance=False)
            self.cache[caption] = (t5[0].float().cpu(), mask[0].cpu(), gpt2[0].float().cpu())
        entries = [self.cache[caption] for caption in captions]
        length = max(entry[0].shape[0] for entry in entries)
        t5 = torch.stack([F.pad(entry[0], (0, 0, 0, length - entry[0].shape[0])) for entry in entries])
        mask = torch.stack([F.pad(entry[1], (0, length - entry[1].shape[0])) for entry in entries])
        gpt2 = torch.stack([entry[2] for entry in entries])
        return t5.to(device), mask.to(device), gpt2.to(device)


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float
    warmup_steps: int
    seed: int
    start_step: int  # optimizer steps already done (a resumed run)


class UNetFinetune(pl.LightningModule):
    def __init__(self, unet: torch.nn.Module, pipe: AudioLDM2Pipeline, config: OptimConfig,
                 optimizer_state: dict | None = None):
        super().__init__()
        self.unet = unet  # the only registered module: Lightning moves and optimizes just this
        self.config = config
        self._pipe = [pipe]  # in a list so Lightning does not adopt (move, cast, count) the frozen parts
        self._optimizer_state = optimizer_state
        self.conditioning = Conditioning(pipe)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.last_loss: float = math.nan

    @property
    def pipe(self) -> AudioLDM2Pipeline:
        return self._pipe[0]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [param for param in self.unet.parameters() if param.requires_grad]

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int) -> Batch:
        return Batch(batch.mel.to(device), batch.captions, batch.micro_step)

    @torch.no_grad()
    def latents(self, mel: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae = self.pipe.vae
        posterior = vae.encode(mel.to(vae.device, vae.dtype)).latent_dist
        # Sample with our generator (not the global RNG) so resumes are exact.
        eps = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
        return ((posterior.mean + posterior.std * eps) * vae.config.scaling_factor).float()

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(mix_seed(self.config.seed, batch.micro_step, 3))
        size = len(batch.captions)
        latents = self.latents(batch.mel, generator).to(self.device)
        dropped = torch.rand(size, generator=generator) < CFG_DROP_PROBABILITY
        captions = ["" if drop else caption for drop, caption in zip(dropped.tolist(), batch.captions)]
        t5, mask, gpt2 = self.conditioning(captions, self.device)

        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (size,), generator=generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=gpt2, encoder_hidden_states_1=t5,
                               encoder_attention_mask_1=mask, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), target.float())
        self.last_loss = float(loss.detach())
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.config.learning_rate)
        if self._optimizer_state is not None:
            optimizer.load_state_dict(self._optimizer_state)
        start, warmup = self.config.start_step, max(1, self.config.warmup_steps)
        # The warm-up is a function of the absolute step, so it needs no state to resume.
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (start + step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def checkpointed_call(module: torch.nn.Module, *args):
    """Gradient checkpointing for AudioLDM2's UNet (pass to ``unet.enable_gradient_checkpointing``).

    diffusers 0.42's AudioLDM2 blocks hand Transformer2DModel its arguments positionally but skip
    ``added_cond_kwargs``, so with the stock function every later argument lands one slot early
    (the T5 mask becomes the self-attention mask) and the forward fails. Map them by name.
    """
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    if isinstance(module, Transformer2DModel) and len(args) == 7:
        hidden, encoder, timestep, class_labels, attention_kwargs, mask, encoder_mask = args
        call = functools.partial(module.__call__, timestep=timestep, class_labels=class_labels,
                                 cross_attention_kwargs=attention_kwargs, attention_mask=mask,
                                 encoder_attention_mask=encoder_mask, return_dict=False)
        return torch.utils.checkpoint.checkpoint(call, hidden, encoder, use_reentrant=False)
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into safetensors-ready tensors and a JSON-ready rest."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_from(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def lightning_precision(mixed_precision: str, device: torch.device) -> str:
    if device.type != "cuda":
        return "32-true"  # CPU autocast is slow and bf16 matmuls on CPU are not what users asked for
    return {"bf16": "bf16-mixed", "fp16": "16-mixed", "no": "32-true"}[mixed_precision]


def mean_or_nan(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan
