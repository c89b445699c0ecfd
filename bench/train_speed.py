"""Fine-tuning speed and memory: LoRA vs full, gradient checkpointing, bf16 (GPU), cached inputs.

Each configuration runs in its own child process (so peak memory is its own), on the same synthetic
dataset (10.24 s tones, batch 2), with the training module's own pieces (`audioldm.training`):

- "as-is"     : what `UNetFinetune.training_step` does today: VAE encode every step, caption
                embeddings cached per caption (`Conditioning`, pre-filled: the steady state after epoch 1);
- "encode"    : everything encoded every step: VAE + `pipe.encode_prompt` (CLAP, T5, GPT-2) per caption;
- "cached"    : VAE posteriors (mean, std) and caption embeddings computed once; a step samples the latent
                from the cached posterior and runs only the UNet forward/backward and AdamW.

A step = forward, MSE, backward, grad-norm clip 1.0, AdamW, as Lightning runs it. Gradient checkpointing
uses `audioldm.training.checkpointed_call`: diffusers' stock function crashes on AudioLDM2's UNet. Timed after warm-up
steps; samples/s = batch x steps / time. Memory: CPU = process RSS (peak sampled every 2 ms from the
first step on, and its increase over the RSS before the first step); CUDA = torch.cuda.max_memory_allocated.

    .venv/bin/python bench/train_speed.py --model tiny
    .venv/bin/python bench/train_speed.py --model full --steps 2 --warmup 1 --configs lora,full
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> (method, gradient checkpointing, data mode, precision)
CONFIGS = {
    "lora": ("lora", False, "as-is", "fp32"),
    "lora-encode": ("lora", False, "encode", "fp32"),
    "lora-cached": ("lora", False, "cached", "fp32"),
    "lora-ckpt": ("lora", True, "as-is", "fp32"),
    "full": ("full", False, "as-is", "fp32"),
    "full-cached": ("full", False, "cached", "fp32"),
    "full-ckpt": ("full", True, "as-is", "fp32"),
    "lora-bf16": ("lora", False, "as-is", "bf16"),
    "full-bf16": ("full", False, "as-is", "bf16"),
    "full-bf16-ckpt-cached": ("full", True, "cached", "bf16"),
}
GPU_ONLY = {"lora-bf16", "full-bf16", "full-bf16-ckpt-cached"}

CAPTIONS = ["a pure tone at 220 hertz", "a pure tone at 330 hertz", "a pure tone at 440 hertz",
            "a pure tone at 550 hertz", "a pure tone at 660 hertz", "a pure tone at 880 hertz"]


def make_dataset(folder: Path) -> list[tuple[Path, str]]:
    import soundfile as sf

    items = []
    for index, caption in enumerate(CAPTIONS):
        frequency = int(caption.split()[-2])
        t = np.arange(int(16000 * 10.24)) / 16000
        path = folder / f"tone-{index}.wav"
        sf.write(path, (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32), 16000)
        items.append((path, caption))
    return items


class PeakRSS:
    """Peak resident memory of this process, sampled in a thread (ru_maxrss can't be reset)."""

    def __init__(self):
        import psutil

        self._process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return self._process.memory_info().rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __enter__(self) -> PeakRSS:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def run_one(name: str, model_path: Path, steps: int, warmup: int, batch_size: int) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import AudioLDM2UNet2DConditionModel

    from audioldm import adapters
    from audioldm.loading import load_pipeline
    from audioldm.settings import Settings
    from audioldm.training import (CFG_DROP_PROBABILITY, Batch, Conditioning, OptimConfig, StepBatches, UNetFinetune,
                                   checkpointed_call, mix_seed)

    method, checkpointing, data_mode, precision = CONFIGS[name]
    settings = Settings.from_env()
    device = settings.device
    cuda = device.type == "cuda"
    pipe = load_pipeline(model_path, device, settings.dtype)  # the warm frozen pipeline, as in the worker
    # The trainable UNet: a fresh fp32 copy, set up as audioldm.finetune_job does.
    unet = AudioLDM2UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", torch_dtype=torch.float32)
    unet.requires_grad_(method == "full")
    if checkpointing:
        # Stock enable_gradient_checkpointing() crashes on this UNet (see checkpointed_call): use the fixed one.
        unet.enable_gradient_checkpointing(checkpointed_call)
    if method == "lora":
        torch.manual_seed(0)
        adapters.add_adapter(unet, "bench", adapters.lora_config(8, 8.0))
        adapters.trainable_parameters(unet, "bench")
        adapters.activate(unet, "bench")
    unet.to(device).train()
    module = UNetFinetune(unet, pipe, OptimConfig(1e-4, 0, 0, 0)).to(device)  # sets module.device
    params = module.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    with tempfile.TemporaryDirectory() as folder:
        items = make_dataset(Path(folder))
        start = time.perf_counter()
        batches = [Batch(b.mel.to(device), b.captions, b.micro_step)
                   for b in StepBatches(items, batch_size, seed=0, start=0, stop=warmup + steps)]
        data_s = (time.perf_counter() - start) / len(batches)

    conditioning = module.conditioning
    with torch.no_grad():
        conditioning(CAPTIONS + [""], device)  # steady state: every caption (and the CFG-dropped one) cached
        posteriors = {}
        if data_mode == "cached":
            for batch in batches:
                dist = pipe.vae.encode(batch.mel.to(pipe.vae.dtype)).latent_dist
                posteriors[batch.micro_step] = (dist.mean.float(), dist.std.float())

    def loss_of(batch: Batch) -> torch.Tensor:
        if data_mode == "as-is":
            return module.training_step(batch, 0)  # the production code path
        # The same recipe as UNetFinetune.training_step, with the inputs encoded differently.
        generator = torch.Generator().manual_seed(mix_seed(0, batch.micro_step, 3))
        size = len(batch.captions)
        if data_mode == "cached":
            mean, std = posteriors[batch.micro_step]
            eps = torch.randn(mean.shape, generator=generator).to(mean)
            latents = (mean + std * eps) * pipe.vae.config.scaling_factor
        else:
            latents = module.latents(batch.mel, generator).to(device)
        dropped = torch.rand(size, generator=generator) < CFG_DROP_PROBABILITY
        captions = ["" if drop else caption for drop, caption in zip(dropped.tolist(), batch.captions)]
        if data_mode == "encode":
            t5, mask, gpt2 = Conditioning(pipe)(captions, device)  # a fresh cache: encodes every caption
        else:
            t5, mask, gpt2 = conditioning(captions, device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, module.noise_scheduler.config.num_train_timesteps, (size,),
                                  generator=generator).to(device)
        noisy = module.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=gpt2, encoder_hidden_states_1=t5,
                          encoder_attention_mask_1=mask, return_dict=False)[0]
        return F.mse_loss(prediction.float(), noise.float())

    def step(batch: Batch) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sampler = PeakRSS()
    rss_before = sampler.rss()  # models loaded, no step run yet: the increase is activations, grads, AdamW state
    with sampler:
        for batch in batches[:warmup]:
            step(batch)
        step_times, cpu_times, losses = [], [], []
        for batch in batches[warmup:]:
            start, cpu_start = time.perf_counter(), time.process_time()
            losses.append(step(batch))
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    result = {
        "name": name, "method": method, "checkpointing": checkpointing, "data": data_mode, "precision": precision,
        "trainable": sum(p.numel() for p in params), "step_s": statistics.median(step_times),
        "cpu_step_s": statistics.median(cpu_times),
        "samples_per_s": batch_size * len(step_times) / sum(step_times), "data_s": data_s,
        "loss_finite": bool(np.isfinite(losses).all()),
        "rss_peak": sampler.peak, "rss_before": rss_before,
        "max_rss_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if cuda:
        result["cuda_peak"] = torch.cuda.max_memory_allocated()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--configs", help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: run one configuration, print JSON
    args = parser.parse_args()

    from audioldm.architecture import ensure_full_size
    from audioldm.tiny import ensure_tiny

    path = ensure_tiny() if args.model == "tiny" else ensure_full_size()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, path, args.steps, args.warmup, args.batch_size)))
        return

    import torch

    cuda = torch.cuda.is_available() and os.environ.get("DEVICE", "cuda") != "cpu"
    names = args.configs.split(",") if args.configs else [n for n in CONFIGS if cuda or n not in GPU_ONLY]
    skipped = [n for n in names if n in GPU_ONLY and not cuda]
    names = [n for n in names if n not in skipped]
    results = []
    for name in names:
        command = [sys.executable, __file__, "--one", name, "--model", args.model, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        proc = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{name}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))

    if cuda:
        device = torch.cuda.get_device_name()
    else:
        from generate_speed import device_name  # noqa: PLC0415 - same folder

        device = device_name(torch.device("cpu"))
    print(f"\ndevice: {device}   model: {args.model}   batch {args.batch_size} x 10.24 s clips   "
          f"{args.steps} timed steps after {args.warmup} warm-up   load average at end: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    mem = "CUDA peak GB" if cuda else "peak RSS GB"
    print(f"{'config':<24}{'method':<7}{'ckpt':<6}{'inputs':<8}{'prec':<6}{'trainable':>13}{'s/step':>9}"
          f"{'samples/s':>11}{'vs lora':>9}{'CPU s/step':>11}{mem:>14}{'+RSS GB':>9}")
    reference = next((r for r in results if r["name"] == "lora"), None)
    for r in results:
        peak = r["cuda_peak"] if cuda else r["rss_peak"]
        ratio = f"{r['samples_per_s'] / reference['samples_per_s']:.2f}x" if reference else "-"
        print(f"{r['name']:<24}{r['method']:<7}{('on' if r['checkpointing'] else 'off'):<6}{r['data']:<8}"
              f"{r['precision']:<6}{r['trainable']:>13,}{r['step_s']:>9.3f}{r['samples_per_s']:>11.2f}{ratio:>9}"
              f"{r['cpu_step_s']:>11.3f}"
              f"{peak / 1e9:>14.2f}{(r['rss_peak'] - r['rss_before']) / 1e9:>9.2f}"
              + ("" if r["loss_finite"] else "  (loss not finite)"))
    print("s/step: median wall time; samples/s: batch x steps / total wall time; CPU s/step: this process's CPU "
          "time (more stable on a shared machine with 1 thread)")
    if results:
        print(f"data loading (wav -> log-mel, not in s/step): {statistics.median(r['data_s'] for r in results):.3f} "
              "s per batch")
    if skipped:
        print(f"not measured (needs a GPU): {', '.join(skipped)}")


if __name__ == "__main__":
    main()
