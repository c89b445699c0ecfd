"""Worker loss: a fine-tune whose process is SIGKILLed at random steps, again and again.

Each run is ``python handler.py --test_input <job>`` (as RunPod's local mode runs it), started
through ``runpy`` with one change: progress is logged after every optimizer step instead of
every 5 s, so the test knows which step the process had reached when it died. The kill points
come from a seeded RNG (``SEED``), land anywhere in a step (training, saving, uploading), and
are a real ``SIGKILL`` of the process group: no cleanup, no final save.

What holds, for every kill:
- every checkpoint listed afterwards is complete (its files download and match their sha256);
- the next run resumes from the newest complete checkpoint (its first step is that one + 1);
- work lost to the kill is at most ``save_every_steps`` steps;
and at the end, the run finishes with the right step, and its final checkpoint downloads and
loads (``load_tensors``).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from audioldm import checkpoints
from audioldm.storage import S3Credentials, Storage
from helpers import tone_dataset_zip

REPO = Path(__file__).resolve().parent.parent
SEED = 20261122
KILLS = 3
MAX_STEPS = 12
SAVE_EVERY = 2
STEP_TIMEOUT_S = 120.0  # a generous wait for any one step (startup included) on a loaded machine

# handler.py, run as __main__, with progress logged after every step (see the module docstring).
RUNNER = ("import runpy, sys; import audioldm.finetune_job as f; f.PROGRESS_EVERY_S = 0; "
          "sys.argv = ['handler.py', *sys.argv[1:]]; runpy.run_path('handler.py', run_name='__main__')")
STEP_RE = re.compile(r"progress: \{'stage': 'training', 'step': (\d+),")


class Run:
    """One worker process; its merged stdout/stderr is read line by line in a thread."""

    def __init__(self, job: dict, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.steps: list[int] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen([sys.executable, "-c", RUNNER, "--test_input", json.dumps(job)], cwd=REPO,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                match = STEP_RE.search(line)
                if match:
                    self.steps.append(int(match.group(1)))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_step(self, step: int) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        with self._changed:
            while not (self.steps and self.steps[-1] >= step):
                assert self.proc.poll() is None, f"the worker exited before step {step}:\n{self.tail()}"
                assert time.monotonic() < deadline, f"no step {step} within {STEP_TIMEOUT_S:.0f}s:\n{self.tail()}"
                self._changed.wait(timeout=0.5)

    def kill(self) -> int:
        """SIGKILL the whole process group; returns the last step it logged before dying."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)  # drain: lines written before death still count
        return self.steps[-1] if self.steps else 0

    def finish(self) -> str:
        self.proc.wait(timeout=300)
        self._reader.join(timeout=30)
        return "".join(self.lines)

    def tail(self, lines: int = 40) -> str:
        return "".join(self.lines[-lines:])


@pytest.fixture(scope="module")
def bucket(s3, tmp_path_factory) -> str:
    name = s3.make_bucket()
    s3.client().upload_file(str(tone_dataset_zip(tmp_path_factory.mktemp("loss") / "tones.zip")), name,
                            "datasets/tones.zip")
    return name


def _interrupted_folders(s3, bucket: str, run_uri: str) -> set[str]:
    """Checkpoint folders holding files but no manifest: uploads the kill cut short."""
    prefix = run_uri.removeprefix(f"s3://{bucket}/") + "checkpoints/"
    listing = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    folders: dict[str, set[str]] = {}
    for item in listing:
        folder, _, name = item["Key"].removeprefix(prefix).partition("/")
        folders.setdefault(folder, set()).add(name)
    return {folder for folder, names in folders.items() if checkpoints.MANIFEST not in names}


def test_fine_tune_survives_repeated_kills(s3, bucket, tiny_model_dir, tmp_path, capsys):
    rng = random.Random(SEED)
    run_uri = f"s3://{bucket}/runs/killed-{SEED}/"
    job = {"input": {"task": "finetune", "dataset": f"s3://{bucket}/datasets/tones.zip", "output": {"uri": run_uri},
                     "max_steps": MAX_STEPS, "save_every_steps": SAVE_EVERY, "batch_size": 2, "warmup_steps": 0,
                     "learning_rate": 1e-2, "validation_steps": 2, "validation_prompts": ["x"]}}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("BUCKET_", "AWS_", "RUNPOD_"))},
           "DEFAULT_MODEL": "tiny", "AUDIOLDM_TINY_DIR": str(tiny_model_dir), "HF_HUB_OFFLINE": "1",
           "BUCKET_ENDPOINT_URL": s3.endpoint_url, "BUCKET_ACCESS_KEY_ID": s3.access_key,
           "BUCKET_SECRET_ACCESS_KEY": s3.secret_key, "WORK_DIR": str(tmp_path / "work"),
           "LOCAL_STORAGE_ROOTS": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "DEVICE": "cpu"}
    storage = Storage(S3Credentials(s3.endpoint_url, s3.access_key, s3.secret_key, region="us-east-1"))
    started = time.monotonic()
    resumed_from = 0
    report = []
    interrupted_uploads: set[str] = set()

    for kill in range(1, KILLS + 1):
        run = Run(job, env)
        # A random step a little past the resume point, then a random moment inside the next step.
        target = rng.randint(resumed_from + 1, min(resumed_from + 2 * SAVE_EVERY, MAX_STEPS - 2))
        run.wait_for_step(target)
        if run.steps[0] != resumed_from + 1:
            pytest.fail(f"run {kill} started at step {run.steps[0]}, not {resumed_from + 1}:\n{run.tail()}")
        time.sleep(rng.uniform(0.0, 0.8))
        last_logged = run.kill()

        saved = checkpoints.list_checkpoints(storage, run_uri)
        assert saved, f"kill {kill} (step {last_logged}): no complete checkpoint listed"
        for step, uri in saved:  # each listed checkpoint is whole: downloads and verifies
            folder, manifest = checkpoints.download_checkpoint(storage, uri, tmp_path / "verify")
            assert manifest.step == step and all((folder / name).is_file() for name in manifest.files)
        newest = saved[-1][0]
        lost = last_logged + 1 - newest  # the process may have finished one more, unlogged, step
        assert newest <= last_logged + 1 and lost <= SAVE_EVERY, (kill, last_logged, newest)
        interrupted_uploads |= _interrupted_folders(s3, bucket, run_uri)
        report.append(f"kill {kill}: last logged step {last_logged}, resumed from {newest} "
                      f"(<= {max(lost, 0)} step(s) lost)")
        resumed_from = newest

    final = Run(job, env)
    output = final.finish()
    assert final.proc.returncode == 0, final.tail()
    assert final.steps and final.steps[0] == resumed_from + 1, final.tail()
    result = re.search(r"Job result: (\{.*\})\s*$", output, re.MULTILINE)
    assert result and f"'resumed_from': {resumed_from}" in result.group(1) and "'complete': True" in result.group(1)

    step, uri = checkpoints.latest_checkpoint(storage, run_uri)
    assert step == MAX_STEPS and uri == f"{run_uri}checkpoints/{checkpoints.step_dir_name(MAX_STEPS)}/"
    folder, manifest = checkpoints.download_checkpoint(storage, uri, tmp_path / "final")
    assert manifest.step == MAX_STEPS and manifest.method == "lora"
    adapter = checkpoints.load_tensors(folder / "adapter.safetensors")
    optimizer = checkpoints.load_tensors(folder / "optimizer.safetensors")
    assert adapter and optimizer and all(t.isfinite().all() for t in adapter.values())

    seconds = time.monotonic() - started
    summary = (f"{KILLS} kills survived (seed {SEED}); " + "; ".join(report) +
               f"; {len(interrupted_uploads)} interrupted checkpoint upload(s) ignored "
               f"{sorted(interrupted_uploads)}; finished at step {step} in {seconds:.0f}s")
    with capsys.disabled():
        print("\n" + summary)
