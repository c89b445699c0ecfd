"""Fine-tune jobs on the tiny model: datasets from SeaweedFS, checkpoints back, resume, stop."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from audioldm import checkpoints
from audioldm.storage import Storage
from helpers import decode_audio, list_keys, s3_config, tone_dataset_zip

REPO = Path(__file__).resolve().parent.parent
SMALL = {"batch_size": 2, "validation_steps": 2, "warmup_steps": 0}


@pytest.fixture(scope="module")
def bucket(s3, tmp_path_factory) -> str:
    """A bucket holding datasets/tones.zip."""
    name = s3.make_bucket()
    zip_path = tone_dataset_zip(tmp_path_factory.mktemp("dataset") / "tones.zip")
    s3.client().upload_file(str(zip_path), name, "datasets/tones.zip")
    return name


def finetune(worker, s3, bucket: str, run: str, progress=None, **fields) -> dict:
    job = {"id": f"ft-{run}", "s3Config": s3_config(s3, bucket),
           "input": {"task": "finetune", "dataset": f"s3://{bucket}/datasets/tones.zip",
                     "output": {"uri": f"s3://{bucket}/runs/{run}/"}, **SMALL, **fields}}
    result = worker.run(job, progress=progress)
    assert "error" not in result, result
    return result


def run_storage(s3) -> Storage:
    from audioldm.storage import S3Credentials

    return Storage(S3Credentials(s3.endpoint_url, s3.access_key, s3.secret_key))


def test_lora_run_lands_checkpoints_validation_audio_and_progress(worker, s3, bucket):
    updates = []
    result = finetune(worker, s3, bucket, "lora-a", progress=updates.append, max_steps=4, save_every_steps=2,
                      validation_prompts=["a low hum"])

    assert result["complete"] and result["step"] == 4 and result["steps_this_job"] == 4
    assert result["checkpoint"] == f"s3://{bucket}/runs/lora-a/checkpoints/step-00000004/"
    keys = list_keys(s3, bucket)
    for step in ("00000002", "00000004"):
        prefix = f"runs/lora-a/checkpoints/step-{step}/"
        assert {key.removeprefix(prefix) for key in keys if key.startswith(prefix)} == {
            "adapter.safetensors", "optimizer.safetensors", "training_state.json", "manifest.json"}
    [clip] = result["validation"]
    assert clip["uri"] == f"s3://{bucket}/runs/lora-a/validation/step-00000004/000-a-low-hum.wav"
    assert clip["url"].startswith(s3.endpoint_url)
    steps = [update["step"] for update in updates if update.get("stage") == "training"]
    assert steps == sorted(set(steps)) and steps[-1] == 4
    assert all({"loss", "lr", "eta_s", "max_steps"} <= update.keys() for update in updates if "step" in update)


@pytest.mark.parametrize(("method", "learning_rate", "min_drop"), [("full", 1e-3, 0.15), ("lora", 1e-2, 0.03)])
def test_loss_on_the_training_data_falls(worker, s3, bucket, method, learning_rate, min_drop):
    # 12 steps on six tones. The tiny UNet starts near MSE 1.1 (random weights predicting noise);
    # measured on this setup: full falls ~30 % and LoRA ~6 % in 12 steps, so the thresholds
    # (15 % and 3 %) leave room for numeric noise while failing if training does nothing.
    result = finetune(worker, s3, bucket, f"loss-{method}", method=method, learning_rate=learning_rate,
                      max_steps=12, save_every_steps=100, batch_size=4)
    losses = [loss for _, loss in result["loss"]["history"]]
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < (1 - min_drop) * first, losses


def _inline_audio(result: dict) -> np.ndarray:
    return decode_audio(base64.b64decode(result["outputs"][0]["audio_base64"]))[0]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_generate_from_a_checkpoint_differs_from_base_and_repeats(worker, s3, bucket, method):
    result = finetune(worker, s3, bucket, f"gen-{method}", method=method, max_steps=3, save_every_steps=3,
                      learning_rate=5e-2 if method == "lora" else 1e-3, validation_prompts=["x"])
    job = {"task": "generate", "prompt": "a pure tone at 440 hertz", "duration_s": 1.0, "steps": 4,
           "candidates": 1, "seed": 5}

    base = worker.run({"id": "g0", "input": job})
    # s3Config without a bucket name: the checkpoint is read from S3, the audio comes back inline.
    tuned = worker.run({"id": "g1", "s3Config": s3_config(s3),
                        "input": {**job, "model": f"s3://{bucket}/runs/gen-{method}/"}})
    again = worker.run({"id": "g2", "s3Config": s3_config(s3),
                        "input": {**job, "model": result["checkpoint"]}})
    base_again = worker.run({"id": "g3", "input": job})

    assert tuned["model"]["name"] == f"s3://{bucket}/runs/gen-{method}/"
    assert not np.array_equal(_inline_audio(base), _inline_audio(tuned))
    assert np.array_equal(_inline_audio(tuned), _inline_audio(again))
    # The adapter on the shared base UNet is switched off again for plain jobs.
    assert np.array_equal(_inline_audio(base), _inline_audio(base_again))
    assert not again["model"]["loaded_this_job"]


def test_resumed_run_equals_an_uninterrupted_one(worker, outputs_root, tmp_path):
    dataset = tone_dataset_zip(outputs_root / "tones-resume.zip")
    job = {"task": "finetune", "dataset": str(dataset), "max_steps": 4, "save_every_steps": 2,
           "learning_rate": 1e-2, **SMALL, "validation_prompts": ["x"]}
    straight = worker.run({"id": "a", "input": {**job, "output": {"uri": str(outputs_root / "straight")}}})
    half = worker.run({"id": "b", "input": {**job, "max_steps": 2, "output": {"uri": str(outputs_root / "halves")}}})
    rest = worker.run({"id": "c", "input": {**job, "output": {"uri": str(outputs_root / "halves")}}})

    assert half["step"] == 2 and rest["resumed_from"] == 2 and rest["steps_this_job"] == 2
    assert rest["loss"]["history"] == straight["loss"]["history"][2:]
    a = checkpoints.load_tensors(Path(straight["checkpoint"]) / "adapter.safetensors")
    b = checkpoints.load_tensors(Path(rest["checkpoint"]) / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_same_job_sent_again_after_completion_trains_nothing(worker, s3, bucket):
    finetune(worker, s3, bucket, "twice", max_steps=2, save_every_steps=2, validation_prompts=["x"])
    again = finetune(worker, s3, bucket, "twice", max_steps=2, save_every_steps=2, validation_prompts=["x"])
    assert again["steps_this_job"] == 0 and again["complete"] and again["step"] == 2


def test_a_different_job_into_the_same_run_directory_is_refused(worker, s3, bucket):
    finetune(worker, s3, bucket, "mixed", max_steps=1, save_every_steps=1, validation_prompts=["x"])
    result = worker.run({"id": "m", "s3Config": s3_config(s3, bucket), "input": {
        "task": "finetune", "method": "full", "dataset": f"s3://{bucket}/datasets/tones.zip",
        "output": {"uri": f"s3://{bucket}/runs/mixed/"}, "max_steps": 2}})
    assert "different run" in result["error"] and "new output.uri" in result["error"]


def test_max_runtime_saves_then_returns_and_the_next_job_resumes(worker, s3, bucket):
    first = finetune(worker, s3, bucket, "deadline", max_steps=50, save_every_steps=100, max_runtime_s=1.0,
                     validation_prompts=["x"])
    assert not first["complete"] and first["stopped"] == "max_runtime_s"
    assert 1 <= first["step"] < 50 and "send the same job again" in first["resume"]
    assert first["checkpoint"].endswith(f"step-{first['step']:08d}/")

    second = finetune(worker, s3, bucket, "deadline", max_steps=first["step"] + 2, save_every_steps=100,
                      validation_prompts=["x"])
    assert second["resumed_from"] == first["step"] and second["complete"]


def test_cancel_saves_a_checkpoint_before_stopping(worker, s3, bucket):
    job = {"id": "cancel", "s3Config": s3_config(s3, bucket), "input": {
        "task": "finetune", "dataset": f"s3://{bucket}/datasets/tones.zip", **SMALL,
        "output": {"uri": f"s3://{bucket}/runs/cancelled/"}, "max_steps": 200, "save_every_steps": 1000}}

    async def cancel_after_two_steps() -> None:
        reached = asyncio.Event()
        loop = asyncio.get_running_loop()

        def progress(update: dict) -> None:
            if update.get("step", 0) >= 2:
                loop.call_soon_threadsafe(reached.set)

        task = asyncio.create_task(worker.run_async(job, progress))
        await reached.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_after_two_steps())
    [(step, uri)] = checkpoints.list_checkpoints(run_storage(s3), f"s3://{bucket}/runs/cancelled/")
    assert 2 <= step < 200


def test_hostile_dataset_is_rejected_with_rows_and_nothing_is_trained(worker, s3, bucket, tmp_path):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.csv", "audio,caption\nwavs/missing.wav,a dog\n../../etc/passwd,escape\nx.wav,\n")
        archive.writestr("../evil.wav", b"RIFF")
    s3.client().upload_file(str(path), bucket, "datasets/bad.zip")

    result = worker.run({"id": "bad", "s3Config": s3_config(s3, bucket), "input": {
        "task": "finetune", "dataset": f"s3://{bucket}/datasets/bad.zip",
        "output": {"uri": f"s3://{bucket}/runs/bad/"}, "max_steps": 2}})

    error = result["error"]
    assert error.startswith("Dataset rejected")
    assert "row 2" in error and "row 3" in error and "row 4" in error and "../evil.wav" in error
    assert not [key for key in list_keys(s3, bucket) if key.startswith("runs/bad/")]


def test_killed_worker_resumes_from_its_last_complete_checkpoint(s3, bucket, tiny_model_dir, tmp_path):
    run_uri = f"s3://{bucket}/runs/killed/"
    job = {"input": {"task": "finetune", "dataset": f"s3://{bucket}/datasets/tones.zip", **SMALL,
                     "output": {"uri": run_uri}, "max_steps": 10, "save_every_steps": 2,
                     "validation_prompts": ["x"]}}
    env = {**os.environ, "DEFAULT_MODEL": "tiny", "AUDIOLDM_TINY_DIR": str(tiny_model_dir),
           "BUCKET_ENDPOINT_URL": s3.endpoint_url, "BUCKET_ACCESS_KEY_ID": s3.access_key,
           "BUCKET_SECRET_ACCESS_KEY": s3.secret_key, "WORK_DIR": str(tmp_path / "work"),
           "LOCAL_STORAGE_ROOTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    storage = run_storage(s3)

    process = subprocess.Popen([sys.executable, "handler.py", "--test_input", json.dumps(job)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not checkpoints.list_checkpoints(storage, run_uri):
            assert process.poll() is None, "the worker exited before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # a real kill: no cleanup, no final save
        process.wait()

    saved = checkpoints.list_checkpoints(storage, run_uri)
    assert saved and saved[-1][0] < 10
    for _, uri in saved:  # every listed checkpoint is whole: its manifest's files all exist
        folder, manifest = checkpoints.download_checkpoint(storage, uri, tmp_path / "verify")
        assert all((folder / name).is_file() for name in manifest.files)

    resumed = subprocess.run([sys.executable, "handler.py", "--test_input", json.dumps(job)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert checkpoints.latest_checkpoint(storage, run_uri)[0] == 10
    assert f"resumed_from': {saved[-1][0]}" in resumed.stdout + resumed.stderr or \
        f'"resumed_from": {saved[-1][0]}' in resumed.stdout + resumed.stderr


def test_missing_or_oversized_dataset_fails_before_training(worker, s3, bucket, outputs_root):
    from audioldm.settings import Settings
    from audioldm.worker import Worker

    job = {"task": "finetune", "dataset": f"s3://{bucket}/datasets/nope.zip",
           "output": {"uri": f"s3://{bucket}/runs/none/"}}
    missing = worker.run({"id": "m", "s3Config": s3_config(s3, bucket), "input": job})
    assert "not found" in missing["error"] and "datasets/nope.zip" in missing["error"]

    small = Worker(Settings(default_model="tiny", local_roots=[outputs_root], max_dataset_bytes=1000))
    too_big = small.run({"id": "b", "s3Config": s3_config(s3, bucket),
                         "input": {**job, "dataset": f"s3://{bucket}/datasets/tones.zip"}})
    assert "MAX_DATASET_BYTES" in too_big["error"]
    assert small.models.loads == 0  # refused before any model was loaded
    assert not [key for key in list_keys(s3, bucket) if key.startswith("runs/none/")]
