"""Load: many jobs on one warm worker, rotating models, and concurrent requests over HTTP.

1. ``JOBS`` sequential generate jobs on one worker, rotating base -> LoRA A -> LoRA B (two tiny
   adapters trained here first). The base is loaded once (``worker.models.loads`` never moves),
   each adapter is read from storage and injected once, every job of one model gives the same
   audio bit for bit (no adapter bleeds into another model's job), and resident memory grows less
   than ``RSS_GROWTH_BOUND_MB`` between job 20 and the last job.
2. With ``max_cached_adapters=1`` every switch evicts the other adapter and reloads it, and
   the audio is identical before and after an eviction.
3. ``CONCURRENT`` requests sent at once to the local RunPod API (``handler.py --rp_serve_api``),
   each with its own prompt, seed, scheduler and steps, writing to S3: each result names its own prompt, its
   object key carries its own job id and prompt slug, and its audio equals a sequential rerun of
   the same prompt and seed in this process.
"""

from __future__ import annotations

import base64
import gc
import io
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf

from audioldm import adapters
from audioldm.outputs import slug
from helpers import s3_config, tone_dataset_zip

JOBS = 200
RSS_AT_JOB = 20
RSS_GROWTH_BOUND_MB = 150.0
CONCURRENT = 6
ROTATION = ("base", "A", "B")
JOB = {"task": "generate", "prompt": "a dog barking in the rain", "duration_s": 0.5, "steps": 1, "candidates": 1,
       "seed": 11}
# Over HTTP only the 16-bit WAV comes back; 5 s clips of the tiny model keep ~150 non-zero
# samples whose places depend on prompt and seed, enough to tell requests apart.
CONCURRENT_JOB = {**JOB, "duration_s": 5.0}


def decode(entry: dict) -> np.ndarray:
    return sf.read(io.BytesIO(base64.b64decode(entry["audio_base64"])), dtype="float32")[0]


@pytest.fixture
def float_audio(monkeypatch) -> list[np.ndarray]:
    """The float waveform of every clip generated in this process, in order.

    The tiny test model's audio is so quiet (|x| ~ 1e-5) that 16-bit PCM rounds half-second clips
    to near silence, so sameness is checked on the float output, captured here by a spy around
    the generate step (it returns what it got, unchanged).
    """
    import audioldm.generate_job as generate_job

    captured: list[np.ndarray] = []
    real = generate_job.generate

    def spy(model, job):
        clips = real(model, job)
        captured.extend(clip.audio.copy() for clip in clips)
        return clips

    monkeypatch.setattr(generate_job, "generate", spy)
    return captured


def make_worker(root: Path, **overrides):
    from audioldm.settings import Settings
    from audioldm.worker import Worker

    for name in ("roots", "work", "cache"):
        (root / name).mkdir(parents=True, exist_ok=True)
    worker = Worker(Settings(default_model="tiny", local_roots=[root / "roots"], model_search_dirs=[],
                             work_dir=root / "work", checkpoint_cache_dir=root / "cache", **overrides))
    worker.warm_up()
    return worker


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread, as the API server runs (api_server.py): on a busy 2-core machine torch's
    default of one thread per core made tiny jobs 20-100x slower and their timings meaningless."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bucket(s3, tmp_path_factory) -> str:
    name = s3.make_bucket()
    s3.client().upload_file(str(tone_dataset_zip(tmp_path_factory.mktemp("load") / "tones.zip")), name,
                            "datasets/tones.zip")
    return name


@pytest.fixture(scope="module")
def load_worker(tmp_path_factory):
    return make_worker(tmp_path_factory.mktemp("load-worker"))


@pytest.fixture(scope="module")
def loras(load_worker, s3, bucket) -> dict[str, str]:
    """Two tiny LoRA checkpoints (different seeds) trained on the load worker: name -> folder URI."""
    uris = {}
    for name, seed in (("A", 1), ("B", 2)):
        result = load_worker.run({"id": f"train-{name}", "s3Config": s3_config(s3, bucket), "input": {
            "task": "finetune", "dataset": f"s3://{bucket}/datasets/tones.zip", "seed": seed,
            "output": {"uri": f"s3://{bucket}/runs/lora-{name}/"}, "max_steps": 2, "save_every_steps": 2,
            "learning_rate": 5e-2, "batch_size": 2, "warmup_steps": 0, "validation_steps": 1,
            "validation_prompts": ["x"]}})
        assert "error" not in result, result
        uris[name] = result["checkpoint"]
    return uris


def job_for(model: str, loras: dict[str, str], s3, **fields) -> dict:
    job = {"input": {**JOB, **fields}}
    if model != "base":
        job["input"]["model"] = loras[model]
        job["s3Config"] = s3_config(s3)  # to read the checkpoint; no bucket name: audio inline
    return job


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def test_many_jobs_rotating_models_stay_warm_correct_and_bounded(load_worker, loras, s3, monkeypatch, capsys,
                                                                float_audio):
    injected = []
    real_load_adapter = adapters.load_adapter
    monkeypatch.setattr(adapters, "load_adapter",
                        lambda unet, name, *a, **k: injected.append(name) or real_load_adapter(unet, name, *a, **k))
    loads_before = load_worker.models.loads
    audio: dict[str, np.ndarray] = {}
    loaded: list[str] = []
    rss: dict[int, float] = {}
    per_model: dict[str, list[float]] = {model: [] for model in ROTATION}
    started = time.monotonic()
    for index in range(1, JOBS + 1):
        model = ROTATION[(index - 1) % len(ROTATION)]
        job_started = time.monotonic()
        result = load_worker.run({"id": f"load-{index}", **job_for(model, loras, s3)})
        per_model[model].append(time.monotonic() - job_started)
        assert "error" not in result, (index, model, result)
        if result["model"]["loaded_this_job"]:
            loaded.append(f"{index}:{model}")
        clip = float_audio[-1]
        if model in audio:
            assert np.array_equal(clip, audio[model]), f"job {index}: {model} sounds different from before"
        audio[model] = clip
        if index in (RSS_AT_JOB, JOBS):
            rss[index] = rss_mb()
    seconds = time.monotonic() - started

    assert load_worker.models.loads == loads_before == 1, "the base model was loaded again"
    assert loaded == ["2:A", "3:B"], loaded  # each adapter once, on its first job
    assert len(injected) == 2, injected
    assert not np.array_equal(audio["base"], audio["A"]) and not np.array_equal(audio["A"], audio["B"])
    assert not np.array_equal(audio["base"], audio["B"])
    growth = rss[JOBS] - rss[RSS_AT_JOB]
    with capsys.disabled():
        medians = ", ".join(f"{m} {1000 * float(np.median(t)):.0f}" for m, t in per_model.items())
        print(f"\n{JOBS} jobs (base/A/B) in {seconds:.1f}s (median ms/job: {medians}); base loads: "
              f"{load_worker.models.loads}; adapter injections: {len(injected)}; RSS after job {RSS_AT_JOB}: "
              f"{rss[RSS_AT_JOB]:.0f} MB, after job {JOBS}: {rss[JOBS]:.0f} MB, growth {growth:+.1f} MB "
              f"(bound {RSS_GROWTH_BOUND_MB:.0f} MB)")
    assert growth < RSS_GROWTH_BOUND_MB


def test_adapter_eviction_and_reload_give_the_same_audio(loras, s3, tmp_path, load_worker, capsys, float_audio):
    small = make_worker(tmp_path / "one-adapter", max_cached_adapters=1)
    sequence = ["A", "B", "A", "base", "B", "A"]
    results = [small.run({"id": f"evict-{i}", **job_for(model, loras, s3)}) for i, model in enumerate(sequence)]
    assert all("error" not in result for result in results), results
    # With room for one adapter, every switch to an adapter evicts the other and reloads this one.
    reloads = [r["model"]["loaded_this_job"] for r in results]
    assert reloads == [True, True, True, False, True, True], reloads
    clips = list(float_audio)
    assert len(clips) == len(sequence)
    assert np.array_equal(clips[0], clips[2]) and np.array_equal(clips[2], clips[5])  # A, evicted twice
    assert np.array_equal(clips[1], clips[4])  # B, evicted and back
    # ...and it is the same audio the worker with a large cache gives.
    for model, clip in (("A", clips[0]), ("B", clips[1]), ("base", clips[3])):
        assert "error" not in load_worker.run({"id": f"ref-{model}", **job_for(model, loras, s3)})
        assert np.array_equal(clip, float_audio[-1]), model
    with capsys.disabled():
        print(f"\nmax_cached_adapters=1: {sum(reloads)} adapter loads for {len(sequence)} jobs, audio identical "
              "before and after each eviction")


def test_concurrent_requests_each_get_their_own_result(api, s3, load_worker, capsys):
    bucket = s3.make_bucket()
    prompts = [f"{word} number {i}" for i, word in enumerate(
        ["thunder", "violin", "birdsong", "engine", "applause", "waterfall"][:CONCURRENT])]
    seeds = [100 + 7 * i for i in range(CONCURRENT)]
    # Mixed settings too: the jobs share one pipeline, whose scheduler each job sets.
    settings = [{"scheduler": ("ddim", "dpmpp")[i % 2], "steps": 1 + i % 3} for i in range(CONCURRENT)]
    responses: list[dict | None] = [None] * CONCURRENT
    barrier = threading.Barrier(CONCURRENT)

    def send(i: int) -> None:
        barrier.wait()
        responses[i] = api.post("/runsync", {"input": {**CONCURRENT_JOB, **settings[i], "prompt": prompts[i],
                                                       "seed": seeds[i], "output": {"uri": f"s3://{bucket}/conc/"}}})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(CONCURRENT)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    seconds = time.monotonic() - started

    ids, clips = set(), []
    for i, response in enumerate(responses):
        assert response is not None and response.get("status") == "COMPLETED", (response, api.log_tail())
        [entry] = response["output"]["outputs"]
        assert entry["prompt"] == prompts[i] and entry["seed"] == seeds[i]
        assert entry["uri"] == f"s3://{bucket}/conc/{response['id']}/000-{slug(prompts[i])}.wav", entry["uri"]
        ids.add(response["id"])
        stored = s3.client().get_object(Bucket=bucket, Key=entry["uri"].removeprefix(f"s3://{bucket}/"))
        served = sf.read(io.BytesIO(stored["Body"].read()), dtype="float32")[0]
        rerun = load_worker.run({"id": f"rerun-{i}", "input": {**CONCURRENT_JOB, **settings[i],
                                                               "prompt": prompts[i], "seed": seeds[i]}})
        assert np.array_equal(served, decode(rerun["outputs"][0])), f"request {i}: not its own audio"
        clips.append(served)
    assert len(ids) == CONCURRENT
    # The comparison can tell requests apart: no two of them gave the same audio.
    assert all(not np.array_equal(a, b) for i, a in enumerate(clips) for b in clips[i + 1:])
    with capsys.disabled():
        print(f"\n{CONCURRENT} concurrent /runsync requests completed in {seconds:.1f}s, each with its own prompt, "
              "key and audio")
