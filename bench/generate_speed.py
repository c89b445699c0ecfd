"""Generation speed: plain diffusers AudioLDM2Pipeline (fp32, the baseline) vs the worker's generate path.

One process, same weights, baseline and ours side by side, the median of several runs after a warm-up.

- baseline: `AudioLDM2Pipeline(...)(prompt, ...)` in float32 with the checkpoint's scheduler (DDIM) or
  diffusers' `DPMSolverMultistepScheduler.from_config(...)` for the fast rows; the same step count,
  guidance and duration as ours. A list of prompts goes in one call (diffusers batches it).
- ours: `Worker.run(job)` end to end (validation, per-prompt generators, the pipeline in the worker's
  dtype = fp16 on CUDA / fp32 on CPU, CLAP scoring, wav encoding, storing to local disk).

Rows: default quality (DDIM 200 steps, guidance 3.5, 1 candidate) and fast mode (scheduler "dpmpp",
25 steps), one prompt and a batch of prompts (clips/s).

`--model full` uses the random-weight full-size build (audioldm/architecture.py, cached on first use).
On a CPU, shorten it with `--steps` and `--duration`; the output says what was shortened and, from the
measured time per UNet call, estimates the time at the real step count.

UNet FLOPs per step are counted with torch.utils.flop_counter on the full-size UNet (on the meta device:
no weights, no compute) for a 10.24 s clip (latent 8x256x16, CFG batch 2). With `--model full`, the
loaded UNet is also timed on that latent to give achieved FLOP/s against the device's peak.

    .venv/bin/python bench/generate_speed.py --model tiny
    .venv/bin/python bench/generate_speed.py --model full --steps 3 --duration 2.56 --runs 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AudioLDM2Pipeline, AudioLDM2UNet2DConditionModel, DDIMScheduler, DPMSolverMultistepScheduler
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from audioldm.architecture import ensure_full_size, load_configs  # noqa: E402
from audioldm.loading import load_pipeline  # noqa: E402
from audioldm.models import resolve_model  # noqa: E402
from audioldm.settings import Settings  # noqa: E402
from audioldm.tiny import ensure_tiny  # noqa: E402
from audioldm.worker import Worker  # noqa: E402

PROMPTS = ["rain on a tin roof", "a dog barking in the distance", "church bells ringing", "footsteps on gravel",
           "a violin playing a slow melody", "waves crashing on rocks", "a busy cafe", "thunder and heavy rain"]

DEFAULT_STEPS, FAST_STEPS, GUIDANCE = 200, 25, 3.5
CLIP_S = 10.24  # the models' training length: latent 8 x 256 x 16

# Dense fp16/bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets.
GPU_PEAKS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("A40", 149.7e12), ("L4", 121e12), ("A10", 125e12), ("RTX 4090", 165e12), ("T4", 65e12)]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """The device's peak FLOP/s and where the number comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS:
            if key.lower() in name.lower():
                if dtype == torch.float32:
                    return None, f"{key}: fp32 peak not tabled (table holds fp16 dense tensor peaks)"
                return peak, f"{key} fp16/bf16 dense tensor peak (data sheet)"
        return None, f"{name}: not in the peak table"
    # CPU: cores x FMA pipes x SIMD lanes x 2 x clock. An estimate; a vCPU may be a shared hyperthread.
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, "CPU peak unknown"
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    if not mhz:
        return None, "CPU peak unknown (no clock in /proc/cpuinfo)"
    lanes = 16 if " avx512f" in flags else 8 if " avx2" in flags else 4
    per_cycle = 2 * 2 * lanes if " fma" in flags else 2 * lanes  # 2 FMA pipes, FMA = 2 FLOPs
    peak = torch.get_num_threads() * per_cycle * mhz[0] * 1e6
    return peak, (f"ESTIMATE: {torch.get_num_threads()} threads x {per_cycle} fp32 FLOP/cycle x {mhz[0]:.0f} MHz "
                  "(real peak unknown: turbo, SMT sharing)")


# Pipeline parts timed inside each call: (label, attribute path on the pipeline).
PARTS = [("CLAP text", "text_encoder.text_model"), ("T5", "text_encoder_2"), ("proj", "projection_model"),
         ("GPT-2", "language_model"), ("UNet", "unet"), ("VAE dec", "vae.decoder"), ("vocoder", "vocoder"),
         ("CLAP audio", "text_encoder.audio_model")]


class Clock:
    """Wall time spent inside each pipeline part's forward. Off by default on CUDA, where it would need
    host syncs; on CPU it costs nothing measurable."""

    def __init__(self, pipe: AudioLDM2Pipeline, enabled: bool):
        self.enabled = enabled
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._start: dict[str, float] = {}
        if enabled:
            for label, attr in PARTS:
                module = pipe
                for name in attr.split("."):
                    module = getattr(module, name)
                module.register_forward_pre_hook(lambda m, a, label=label: self._pre(label))
                module.register_forward_hook(lambda m, a, o, label=label: self._post(label))

    def _pre(self, label: str) -> None:
        self._start[label] = time.perf_counter()

    def _post(self, label: str) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - self._start.pop(label)
        self.calls[label] = self.calls.get(label, 0) + 1

    def reset(self) -> None:
        self.seconds, self.calls = {}, {}


@dataclass
class Timing:
    seconds: float  # median wall time of one call
    cpu_seconds: float  # median CPU time of this process per call (robust to other processes on the machine)
    parts: dict[str, float]  # median seconds per call inside each timed part (empty when the clock is off)
    unet_calls: int  # UNet calls per call (one per denoising step)

    @property
    def unet_per_call(self) -> float | None:
        return self.parts["UNet"] / self.unet_calls if self.unet_calls and "UNet" in self.parts else None


def measure(fn, runs: int, clock: Clock | None, device: torch.device) -> Timing:
    fn()  # warm-up: allocations, kernel selection
    totals, cpu, parts, calls = [], [], [], 0
    for _ in range(runs):
        if clock:
            clock.reset()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        totals.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        if clock and clock.enabled:
            parts.append(dict(clock.seconds))
            calls = clock.calls.get("UNet", 0)
    labels = sorted({label for run in parts for label in run})
    median_parts = {label: statistics.median(run.get(label, 0.0) for run in parts) for label in labels}
    return Timing(statistics.median(totals), statistics.median(cpu), median_parts, calls)


def unet_flops(unet: torch.nn.Module, batch: int, frames: int, t5_tokens: int) -> float:
    """FLOPs of one UNet call (a denoising step) on a (batch, 8, frames, 16) latent."""
    gpt2_dim = unet.config.cross_attention_dim[-1][1]
    t5_dim = unet.config.cross_attention_dim[-1][2]
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    with torch.device(device):
        sample = torch.zeros(batch, unet.config.in_channels, frames, 16, dtype=dtype)
        gpt2 = torch.zeros(batch, 8, gpt2_dim, dtype=dtype)
        t5 = torch.zeros(batch, t5_tokens, t5_dim, dtype=dtype)
        mask = torch.ones(batch, t5_tokens, dtype=torch.long)
        timestep = torch.full((batch,), 500, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(sample, timestep, encoder_hidden_states=gpt2, encoder_hidden_states_1=t5,
             encoder_attention_mask_1=mask, return_dict=False)
    return float(counter.get_total_flops())


def latent_frames(duration_s: float) -> int:
    # 100 mel frames per second (hop 160 at 16 kHz), 4 mel frames per latent frame (VAE scale factor 4).
    return int(round(duration_s * 16000 / 160 / 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--steps", type=int, help="override the step count of every row (default 200 / 25)")
    parser.add_argument("--duration", type=float, default=CLIP_S, help="seconds of audio per clip")
    parser.add_argument("--prompts", type=int, default=4, help="prompts in the batched rows")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per cell (median), after one warm-up")
    parser.add_argument("--rows", default="default-1,default-N,fast-1,fast-N",
                        help="which rows: default-1, default-N, fast-1, fast-N")
    parser.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True,
                        help="count UNet FLOPs (and, with --model full, time the UNet on a 10.24 s latent)")
    parser.add_argument("--clock", action=argparse.BooleanOptionalAction, default=None,
                        help="time the pipeline parts inside each call (default: on for CPU, off for CUDA)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = Settings.from_env()
    device = settings.device
    path = ensure_tiny() if args.model == "tiny" else ensure_full_size()
    out_dir = Path(tempfile.mkdtemp(prefix="bench-out-"))
    worker = Worker(Settings(**{**settings.__dict__, "default_model": str(path), "local_roots": [out_dir],
                                "model_search_dirs": []}))
    load_start = time.perf_counter()
    worker.warm_up()
    model, _ = worker.models.get(resolve_model(str(path), worker.settings, trusted=True))
    ours_pipe = model.pipe
    if settings.dtype == torch.float32:
        # Same device and dtype: share the weights, but build a plain pipeline with the checkpoint's scheduler.
        components = {**ours_pipe.components, "scheduler": DDIMScheduler.from_config(ours_pipe.scheduler.config)}
        baseline = AudioLDM2Pipeline(**components)
        baseline.set_progress_bar_config(disable=True)
    else:
        baseline = load_pipeline(path, device, torch.float32)
    load_s = time.perf_counter() - load_start
    baseline_schedulers = {"ddim": baseline.scheduler,
                           "dpmpp": DPMSolverMultistepScheduler.from_config(baseline.scheduler.config)}

    clock_on = device.type == "cpu" if args.clock is None else args.clock
    clocks = {id(ours_pipe.unet): Clock(ours_pipe, clock_on)}
    if id(baseline.unet) not in clocks:
        clocks[id(baseline.unet)] = Clock(baseline, clock_on)

    modes = {"default": ("ddim", args.steps or DEFAULT_STEPS, DEFAULT_STEPS),
             "fast": ("dpmpp", min(args.steps or FAST_STEPS, FAST_STEPS), FAST_STEPS)}
    rows = []
    for row in args.rows.split(","):
        mode, count = row.rsplit("-", 1)
        rows.append((mode, 1 if count == "1" else args.prompts))

    results = []
    for mode, num_prompts in rows:
        scheduler, steps, real_steps = modes[mode]
        prompts = PROMPTS[:num_prompts] if num_prompts <= len(PROMPTS) else \
            [f"{PROMPTS[i % len(PROMPTS)]} #{i}" for i in range(num_prompts)]

        def plain(prompts=prompts, scheduler=scheduler, steps=steps) -> None:
            baseline.scheduler = baseline_schedulers[scheduler]
            baseline(prompt=prompts[0] if len(prompts) == 1 else prompts, audio_length_in_s=args.duration,
                     num_inference_steps=steps, guidance_scale=GUIDANCE,
                     generator=torch.Generator("cpu").manual_seed(0))

        job = {"id": f"bench-{mode}-{num_prompts}", "input": {
            "task": "generate", "prompt": prompts, "duration_s": args.duration, "steps": steps,
            "guidance_scale": GUIDANCE, "candidates": 1, "seed": 0, "scheduler": scheduler,
            "output": {"uri": str(out_dir)}}}

        def ours(job=job) -> None:
            result = worker.run(job)
            assert "error" not in result, result

        base_t = measure(plain, args.runs, clocks[id(baseline.unet)], device)
        ours_t = measure(ours, args.runs, clocks[id(ours_pipe.unet)], device)
        results.append((mode, scheduler, num_prompts, steps, real_steps, base_t, ours_t))

    shortened = []
    if args.steps:
        shortened.append(f"steps {args.steps} instead of {DEFAULT_STEPS} (default) / {FAST_STEPS} (fast)")
    if abs(args.duration - CLIP_S) > 1e-6:
        shortened.append(f"clips of {args.duration} s instead of {CLIP_S} s (latent {latent_frames(args.duration)} "
                         f"frames instead of 256)")
    print(f"\ndevice: {device_name(device)}   torch {torch.__version__}   load average at end: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (other processes share this machine)")
    print(f"model: {args.model} ({path})   baseline dtype: float32   ours dtype: {settings.dtype}   "
          f"guidance {GUIDANCE}, 1 candidate   runs: {args.runs} (median, after 1 warm-up)   load: {load_s:.1f} s")
    print("SHORTENED: " + "; ".join(shortened) if shortened else "not shortened: real step counts and 10.24 s clips")
    header = (f"{'mode':<8}{'sched':<7}{'prompts':>8}{'steps':>6}{'baseline s':>12}{'ours s':>10}{'ours/base':>10}"
              f"{'base clip/s':>12}{'ours clip/s':>12}{'CPU s b/o':>14}")
    if clock_on:
        header += f"{'UNet s/step':>12}{'est. s @real steps':>20}"
    print(header)
    for mode, scheduler, num_prompts, steps, real_steps, base_t, ours_t in results:
        line = (f"{mode:<8}{scheduler:<7}{num_prompts:>8}{steps:>6}{base_t.seconds:>12.3f}{ours_t.seconds:>10.3f}"
                f"{ours_t.seconds / base_t.seconds:>10.2f}{num_prompts / base_t.seconds:>12.3f}"
                f"{num_prompts / ours_t.seconds:>12.3f}"
                f"{f'{base_t.cpu_seconds:.2f}/{ours_t.cpu_seconds:.2f}':>14}")
        if clock_on and ours_t.unet_per_call and base_t.unet_per_call:
            est_base = base_t.seconds + base_t.unet_per_call * (real_steps - base_t.unet_calls)
            est_ours = ours_t.seconds + ours_t.unet_per_call * (real_steps - ours_t.unet_calls)
            line += f"{ours_t.unet_per_call:>12.3f}{f'{est_base:.1f} / {est_ours:.1f}':>20}"
        print(line)
    print("CPU s b/o = this process's CPU seconds per call, baseline/ours (on a shared machine, more stable than wall"
          " time with 1 thread; with more threads it includes OpenMP spin-waiting)")
    if clock_on:
        print(f"est. s @real steps = baseline / ours: measured time + UNet s/step x ({DEFAULT_STEPS} default or "
              f"{FAST_STEPS} fast - steps run), at this clip length")
        labels = [label for label, _ in PARTS]
        print("\nwhere the time goes (ours, median s per job):")
        print(f"{'row':<12}" + "".join(f"{label:>11}" for label in labels) + f"{'other':>9}{'total':>9}")
        for mode, _, num_prompts, _, _, _, ours_t in results:
            other = ours_t.seconds - sum(ours_t.parts.values())
            print(f"{f'{mode}-{num_prompts}':<12}" + "".join(f"{ours_t.parts.get(label, 0.0):>11.3f}" for label in labels)
                  + f"{other:>9.3f}{ours_t.seconds:>9.3f}")
        print("(CLAP text: prompt encoding and CLAP scoring; CLAP audio: scoring; other: scheduler, resampling, "
              "wav encoding, storage, Python)")
    by_key = {(mode, n): (base_t, ours_t) for mode, _, n, _, _, base_t, ours_t in results}
    if ("default", 1) in by_key and ("fast", 1) in by_key:
        print(f"\nfast (ours) vs default (plain diffusers), 1 prompt, as run: "
              f"{by_key[('default', 1)][0].seconds / by_key[('fast', 1)][1].seconds:.1f}x faster")
    if ("default", 1) in by_key and ("default", args.prompts) in by_key and args.prompts > 1:
        single, batched = by_key[("default", 1)][1].seconds, by_key[("default", args.prompts)][1].seconds
        print(f"batching {args.prompts} prompts (ours, default): {args.prompts * single / batched:.2f}x the clips/s "
              "of one prompt per job")

    if args.flops:
        print_flops(args, device, settings.dtype, ours_pipe, results)


def print_flops(args, device: torch.device, dtype: torch.dtype, pipe: AudioLDM2Pipeline, results) -> None:
    with torch.device("meta"):
        full_unet = AudioLDM2UNet2DConditionModel.from_config(load_configs("audioldm2")["unet"]).eval()
    t5_tokens = pipe.tokenizer_2(PROMPTS[0], return_tensors="pt").input_ids.shape[1]
    per_step = unet_flops(full_unet, 2, 256, t5_tokens)
    print(f"\nfull-size UNet FLOPs per step, 10.24 s clip (latent 8x256x16, CFG batch 2, {t5_tokens} T5 tokens): "
          f"{per_step / 1e9:.1f} GFLOP  -> {DEFAULT_STEPS} steps: {per_step * DEFAULT_STEPS / 1e12:.1f} TFLOP, "
          f"{FAST_STEPS} steps: {per_step * FAST_STEPS / 1e12:.1f} TFLOP")
    peak, peak_note = peak_flops(device, dtype)
    print(f"peak: {f'{peak / 1e12:.3f} TFLOP/s' if peak else 'unknown'} ({peak_note})")
    if args.model != "full":
        print("achieved FLOP/s: not measured (needs --model full)")
        return
    unet = pipe.unet
    frames = latent_frames(args.duration)
    bench_step = unet_flops(full_unet, 2, frames, t5_tokens)
    param = next(unet.parameters())
    with torch.device(device):
        sample = torch.randn(2, 8, 256, 16, dtype=param.dtype)
        gpt2 = torch.randn(2, 8, 768, dtype=param.dtype)
        t5 = torch.randn(2, t5_tokens, 1024, dtype=param.dtype)
        mask = torch.ones(2, t5_tokens, dtype=torch.long)
        timestep = torch.full((2,), 500, dtype=torch.long)

    def step() -> None:
        with torch.inference_mode():
            unet(sample, timestep, encoder_hidden_states=gpt2, encoder_hidden_states_1=t5,
                 encoder_attention_mask_1=mask, return_dict=False)

    seconds = measure(step, args.runs, None, device).seconds
    achieved = per_step / seconds
    frac = f" = {100 * achieved / peak:.0f} % of peak" if peak else ""
    print(f"UNet alone, 10.24 s latent, CFG batch 2, {dtype}: {seconds:.3f} s/step -> "
          f"{achieved / 1e9:.1f} GFLOP/s{frac}")
    for mode, scheduler, num_prompts, steps, _, _, ours_t in results:
        flops = unet_flops(full_unet, 2 * num_prompts, frames, t5_tokens) if num_prompts > 1 else bench_step
        e2e = flops * steps / ours_t.seconds
        unet_rate = f", UNet-only {flops / ours_t.unet_per_call / 1e9:.1f} GFLOP/s" if ours_t.unet_per_call else ""
        frac = f" ({100 * e2e / peak:.0f} % of peak)" if peak else ""
        print(f"ours {mode}-{num_prompts}: UNet FLOPs x steps / job time = {e2e / 1e9:.1f} GFLOP/s{frac}{unet_rate}")


if __name__ == "__main__":
    main()
