"""Handler overhead: a generate job through the worker vs a direct diffusers pipeline call.

Same warm model, same settings, same process; the median of several runs after warm-up.
The worker's extra work is validation, per-prompt generators, CLAP scoring, encoding and
storing the wav (local disk here). Goal: <= 5 % over the bare pipeline call.

    .venv/bin/python bench/handler_overhead.py [--model tiny] [--steps 50] [--duration 10.24] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from audioldm.models import resolve_model  # noqa: E402
from audioldm.settings import Settings  # noqa: E402
from audioldm.worker import Worker  # noqa: E402


def median_seconds(fn, runs: int) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--duration", type=float, default=10.24)
    parser.add_argument("--candidates", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    out_dir = Path(tempfile.mkdtemp(prefix="bench-out-"))
    settings = Settings.from_env()
    worker = Worker(Settings(**{**settings.__dict__, "default_model": args.model, "local_roots": [out_dir]}))
    worker.warm_up()
    source = resolve_model(args.model, worker.settings, trusted=True)
    model, _ = worker.models.get(source)
    pipe = model.pipe
    model.prepare("ddim")

    def direct() -> None:
        pipe("rain on a tin roof", audio_length_in_s=args.duration, num_inference_steps=args.steps,
             guidance_scale=3.5, num_waveforms_per_prompt=args.candidates,
             generator=torch.Generator("cpu").manual_seed(0), output_type="np")

    job = {"id": "bench", "input": {"task": "generate", "prompt": "rain on a tin roof", "duration_s": args.duration,
                                    "steps": args.steps, "candidates": args.candidates,
                                    "output": {"uri": str(out_dir)}}}

    def through_worker() -> None:
        result = worker.run(job)
        assert "error" not in result, result

    baseline = median_seconds(direct, args.runs)
    ours = median_seconds(through_worker, args.runs)
    device = torch.cuda.get_device_name() if settings.device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(f"device: {device}  model: {args.model}  dtype: {settings.dtype}  steps: {args.steps}  "
          f"duration: {args.duration}s  candidates: {args.candidates}  runs: {args.runs}")
    print(f"{'path':<28}{'median s':>10}")
    print(f"{'diffusers pipeline call':<28}{baseline:>10.3f}")
    print(f"{'worker.run (job -> wav)':<28}{ours:>10.3f}")
    print(f"overhead: {100 * (ours / baseline - 1):+.1f} %")


if __name__ == "__main__":
    main()
