"""Cold vs warm: process start -> ready, the first job, and later jobs on the warm model.

    .venv/bin/python bench/warm_vs_cold.py [--model tiny] [--steps 50] [--jobs 4]

Run it in a fresh process (it is one): imports are part of a cold start.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

PROCESS_START = psutil.Process().create_time()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def since_start() -> float:
    return time.time() - PROCESS_START


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--duration", type=float, default=10.24)
    parser.add_argument("--jobs", type=int, default=4)
    args = parser.parse_args()

    import torch

    from audioldm.settings import Settings
    from audioldm.worker import Worker

    imported = since_start()
    out_dir = Path(tempfile.mkdtemp(prefix="bench-out-"))
    settings = Settings.from_env()
    worker = Worker(Settings(**{**settings.__dict__, "default_model": args.model, "local_roots": [out_dir]}))
    worker.warm_up()
    ready = since_start()

    job = {"id": "bench", "input": {"task": "generate", "prompt": "rain on a tin roof", "duration_s": args.duration,
                                    "steps": args.steps, "candidates": 1, "output": {"uri": str(out_dir)}}}
    seconds = []
    for _ in range(args.jobs):
        start = time.perf_counter()
        assert "error" not in worker.run(job)
        seconds.append(time.perf_counter() - start)

    device = torch.cuda.get_device_name() if settings.device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(f"device: {device}  model: {args.model}  steps: {args.steps}  duration: {args.duration}s")
    print(f"{'process start -> imports done':<36}{imported:>8.2f} s")
    print(f"{'process start -> model warm (ready)':<36}{ready:>8.2f} s")
    print(f"{'first job (model already warm)':<36}{seconds[0]:>8.2f} s")
    print(f"{'later jobs, median':<36}{statistics.median(seconds[1:]):>8.2f} s")
    print(f"cold start + first job vs warm job: {(ready + seconds[0]) / statistics.median(seconds[1:]):.1f}x")


if __name__ == "__main__":
    main()
