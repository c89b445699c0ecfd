"""The fine-tune job: dataset zip -> validated clips -> Lightning run -> checkpoints in the run dir.

Read top to bottom: check the run directory and resume point, fetch and validate the dataset
before any GPU time, build the trainable UNet (a LoRA adapter or the whole UNet, in fp32 beside
the warm frozen pipeline), train with checkpoints every ``save_every_steps``, and stop cleanly
(checkpoint first) on cancel or before ``max_runtime_s``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from diffusers import AudioLDM2Pipeline, AudioLDM2UNet2DConditionModel, DDIMScheduler
from torch.utils.data import DataLoader

from audioldm import adapters, checkpoints
from audioldm.context import JobContext
from audioldm.contract import FinetuneJob
from audioldm.dataset import extract_dataset, validate_dataset
from audioldm.errors import JobError
from audioldm.generate import generators_for
from audioldm.models import ModelSource, resolve_model
from audioldm.outputs import CONTENT_TYPES, encode, slug
from audioldm.storage import join
from audioldm.training import (
    OptimConfig,
    StepBatches,
    checkpointed_call,
    UNetFinetune,
    lightning_precision,
    mix_seed,
    optimizer_state_from,
    optimizer_tensors,
)

TRAIN_ADAPTER = "finetune"
WEIGHTS_FILE = {"lora": "adapter.safetensors", "full": "unet.safetensors"}
PROGRESS_EVERY_S = 5.0


def run_finetune(ctx: JobContext, job: FinetuneJob) -> dict[str, Any]:
    started = time.monotonic()
    deadline = started + (job.max_runtime_s or ctx.settings.finetune_max_runtime_s)
    run_uri = job.output.uri.rstrip("/") + "/"
    ctx.storage.check_writable(run_uri)
    base = resolve_model(job.base_model, ctx.settings) if job.base_model else ctx.default_source()
    resumed = _resume_point(ctx, job, base, run_uri)
    if resumed and resumed[1].step >= job.max_steps:
        return _already_done(ctx, job, run_uri, resumed[1])

    items, dataset_summary = _fetch_dataset(ctx, job)
    model, load_s = ctx.models.get(base)
    unet, optimizer_state = _trainable_unet(base, job, resumed)
    start_step = resumed[1].step if resumed else 0
    prompts = job.validation_prompts or list(dict.fromkeys(caption for _, caption in items))[:2]
    control = RunControl(ctx, job, base, run_uri, model.pipe, prompts, start_step, deadline)
    module = UNetFinetune(unet, model.pipe, OptimConfig(job.learning_rate, job.warmup_steps, job.seed, start_step),
                          optimizer_state)
    batches = StepBatches(items, job.batch_size, job.seed, start=start_step * job.gradient_accumulation,
                          stop=job.max_steps * job.gradient_accumulation)
    trainer = pl.Trainer(
        accelerator="gpu" if ctx.settings.device.type == "cuda" else "cpu",
        devices=1,
        precision=lightning_precision(job.mixed_precision, ctx.settings.device),
        max_steps=job.max_steps - start_step,
        accumulate_grad_batches=job.gradient_accumulation,
        gradient_clip_val=1.0,
        callbacks=[control],
        default_root_dir=ctx.work_dir / "lightning",
        enable_checkpointing=False,  # Lightning's checkpoints are pickles; ours are safetensors
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    train_start = time.monotonic()
    trainer.fit(module, DataLoader(batches, batch_size=None))
    control.finish(module, trainer)
    return control.result(dataset_summary, resumed[1].step if resumed else None, {
        "load_s": round(load_s, 3),
        "train_s": round(time.monotonic() - train_start, 3),
        "total_s": round(time.monotonic() - started, 3),
    })


def _resume_point(ctx: JobContext, job: FinetuneJob, base: ModelSource,
                  run_uri: str) -> tuple[Path, checkpoints.Manifest] | None:
    latest = checkpoints.latest_checkpoint(ctx.storage, run_uri)
    if latest is None:
        return None
    local, manifest = checkpoints.download_checkpoint(ctx.storage, latest[1], ctx.work_dir / "resume")
    expected = {"method": job.method, "base_model": base.name}
    found = {"method": manifest.method, "base_model": manifest.base_model}
    if job.method == "lora":
        expected["lora"] = {"rank": job.lora_rank, "alpha": job.lora_alpha}
        found["lora"] = {key: (manifest.lora or {}).get(key) for key in ("rank", "alpha")}
    if found != expected:
        raise JobError(f"run directory {run_uri} holds a different run ({found}); this job asks for {expected}. "
                       "Use a new output.uri, or the same settings to resume")
    return local, manifest


def _already_done(ctx: JobContext, job: FinetuneJob, run_uri: str, manifest: checkpoints.Manifest) -> dict:
    # A job sent twice (a retry, a duplicate webhook) must not train twice.
    uri = join(run_uri, checkpoints.CHECKPOINTS_DIR, checkpoints.step_dir_name(manifest.step)) + "/"
    return {"task": "finetune", "run": run_uri, "checkpoint": uri, "step": manifest.step,
            "max_steps": job.max_steps, "steps_this_job": 0, "resumed_from": manifest.step,
            "complete": True, "stopped": None, "note": "this run had already reached max_steps; nothing trained"}


def _fetch_dataset(ctx: JobContext, job: FinetuneJob) -> tuple[list[tuple[Path, str]], dict]:
    zip_path = ctx.work_dir / "dataset.zip"
    size, limit = ctx.storage.size(job.dataset), ctx.settings.max_dataset_bytes
    if size > limit:
        raise JobError(f"dataset {job.dataset} is {size / 1e9:.1f} GB, above this worker's limit of "
                       f"{limit / 1e9:.1f} GB (MAX_DATASET_BYTES)")
    ctx.progress({"stage": "downloading dataset", "bytes": size})
    ctx.storage.get_file(job.dataset, zip_path)
    report = validate_dataset(zip_path)
    if not report.ok:
        raise JobError(report.error_message())
    items = extract_dataset(zip_path, report, ctx.work_dir / "dataset")
    zip_path.unlink()
    summary = {"clips": len(items), "seconds": round(report.total_seconds, 1),
               "warnings": [str(warning) for warning in report.warnings[:20]]}
    return items, summary


def _trainable_unet(base: ModelSource, job: FinetuneJob,
                    resumed: tuple[Path, checkpoints.Manifest] | None) -> tuple[torch.nn.Module, dict | None]:
    # A fresh fp32 copy from disk: the warm pipeline's UNet stays untouched for generate jobs.
    unet = AudioLDM2UNet2DConditionModel.from_pretrained(base.path, subfolder="unet", torch_dtype=torch.float32)
    unet.requires_grad_(job.method == "full")
    if job.gradient_checkpointing:
        unet.enable_gradient_checkpointing(checkpointed_call)
    weights = checkpoints.load_tensors(resumed[0] / WEIGHTS_FILE[job.method]) if resumed else None
    config = adapters.lora_config(job.lora_rank, job.lora_alpha)
    if job.method == "lora" and weights is not None:
        adapters.load_adapter(unet, TRAIN_ADAPTER, config, weights)
    elif job.method == "lora":
        # LoRA's A matrices start random: seed them, so the job's seed fixes the whole run.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(job.seed, 4))
            adapters.add_adapter(unet, TRAIN_ADAPTER, config)
    elif weights is not None:
        unet.load_state_dict(weights)
    if job.method == "lora":
        adapters.trainable_parameters(unet, TRAIN_ADAPTER)  # freezes the base, unfreezes the adapter
        adapters.activate(unet, TRAIN_ADAPTER)
    unet.train()
    if resumed is None:
        return unet, None
    meta = checkpoints.load_json(resumed[0] / "training_state.json", max_bytes=16 * 1024 * 1024)
    return unet, optimizer_state_from(checkpoints.load_tensors(resumed[0] / "optimizer.safetensors"), meta)


class RunControl(pl.Callback):
    """After every optimizer step: progress, checkpoints, validation audio, cancel and deadline."""

    def __init__(self, ctx: JobContext, job: FinetuneJob, base: ModelSource, run_uri: str,
                 pipe: AudioLDM2Pipeline, validation_prompts: list[str], start_step: int, deadline: float):
        self.ctx, self.job, self.base, self.run_uri, self.pipe = ctx, job, base, run_uri, pipe
        self.validation_prompts = validation_prompts
        self.start_step, self.deadline = start_step, deadline
        self.step = start_step
        self.losses: list[tuple[int, float]] = []
        self.saved_step: int | None = None
        self.checkpoint_uri: str | None = None
        self.validation: list[dict] = []
        self.stopped: str | None = None
        self.step_seconds = 0.0
        self.save_seconds = 0.0
        self._last_progress = 0.0
        self._last_step_end = time.monotonic()
        self._micro_losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: UNetFinetune, outputs, batch, batch_idx) -> None:
        self._micro_losses.append(module.last_loss)
        step = self.start_step + trainer.global_step
        if step == self.step:
            return  # mid gradient-accumulation: no optimizer step yet
        self.step = step
        self._record_step()
        if step % self.job.save_every_steps == 0 or step == self.job.max_steps:
            self._save(module, trainer)
        if self.job.validate_every_steps and step % self.job.validate_every_steps == 0 and step < self.job.max_steps:
            self._validate(module)
        reason = self._stop_reason()
        if reason and step < self.job.max_steps:
            self.stopped = reason
            if self.saved_step != step:
                self._save(module, trainer)
            trainer.should_stop = True
        self._report(trainer, force=self.saved_step == step)

    def finish(self, module: UNetFinetune, trainer: pl.Trainer) -> None:
        if self.saved_step != self.step:
            self._save(module, trainer)
        if self.step >= self.job.max_steps:
            self._validate(module)

    def result(self, dataset: dict, resumed_from: int | None, timings: dict) -> dict[str, Any]:
        history = self.losses[:: max(1, len(self.losses) // 200)]
        losses = [loss for _, loss in self.losses]
        window = max(1, min(10, len(losses) // 2))
        result = {
            "task": "finetune",
            "run": self.run_uri,
            "checkpoint": self.checkpoint_uri,
            "method": self.job.method,
            "base_model": self.base.name,
            "step": self.step,
            "max_steps": self.job.max_steps,
            "steps_this_job": self.step - self.start_step,
            "resumed_from": resumed_from,
            "complete": self.step >= self.job.max_steps,
            "stopped": self.stopped,
            "loss": {
                "first": losses[0] if losses else None,
                "last": losses[-1] if losses else None,
                "mean_first": sum(losses[:window]) / window if losses else None,
                "mean_last": sum(losses[-window:]) / window if losses else None,
                "history": [[step, round(loss, 5)] for step, loss in history],
            },
            "validation": self.validation,
            "dataset": dataset,
            "precision": lightning_precision(self.job.mixed_precision, self.ctx.settings.device),
            "timings": {**timings, "save_s": round(self.save_seconds, 3)},
        }
        if not result["complete"]:
            result["resume"] = f"send the same job again to continue from step {self.step}"
        return result

    def _record_step(self) -> None:
        now = time.monotonic()
        loss = sum(self._micro_losses) / len(self._micro_losses)
        self._micro_losses.clear()
        self.losses.append((self.step, loss))
        elapsed, self._last_step_end = now - self._last_step_end, now
        # Smoothed step time for the ETA and the deadline check.
        self.step_seconds = elapsed if self.step_seconds == 0 else 0.8 * self.step_seconds + 0.2 * elapsed

    def _stop_reason(self) -> str | None:
        if self.ctx.stop.is_set():
            return "cancelled"
        # Leave room for one more step and a save (plus a margin) before the deadline.
        needed = self.step_seconds + max(self.save_seconds, 1.0) * 1.5 + 5.0
        return "max_runtime_s" if time.monotonic() + needed > self.deadline else None

    def _report(self, trainer: pl.Trainer, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = now
        optimizer = trainer.optimizers[0]
        self.ctx.progress({
            "stage": "training",
            "step": self.step,
            "max_steps": self.job.max_steps,
            "loss": round(self.losses[-1][1], 5),
            "lr": optimizer.param_groups[0]["lr"],
            "eta_s": round(self.step_seconds * (self.job.max_steps - self.step), 1),
            "checkpoint": self.checkpoint_uri,
        })

    def _save(self, module: UNetFinetune, trainer: pl.Trainer) -> None:
        start = time.monotonic()
        unet = module.unet
        if self.job.method == "lora":
            weights = adapters.adapter_state_dict(unet, TRAIN_ADAPTER)
            lora = {"rank": self.job.lora_rank, "alpha": self.job.lora_alpha, "target_modules": adapters.TARGET_MODULES}
        else:
            weights = {name: value.detach().cpu().contiguous() for name, value in unet.state_dict().items()}
            lora = None
        optimizer, meta = optimizer_tensors(trainer.optimizers[0].state_dict())
        local = self.ctx.work_dir / "checkpoints" / checkpoints.step_dir_name(self.step)
        checkpoints.write_checkpoint(
            local, self.step,
            tensors={WEIGHTS_FILE[self.job.method]: weights, "optimizer.safetensors": optimizer},
            json_files={"training_state.json": {**meta, "step": self.step}},
            method=self.job.method, base_model=self.base.name, lora=lora, seed=self.job.seed,
            max_steps=self.job.max_steps,
            extra={"learning_rate": self.job.learning_rate, "batch_size": self.job.batch_size,
                   "gradient_accumulation": self.job.gradient_accumulation},
        )
        self.checkpoint_uri = checkpoints.upload_checkpoint(self.ctx.storage, local, self.run_uri)
        shutil.rmtree(local, ignore_errors=True)
        self.saved_step = self.step
        self.save_seconds = time.monotonic() - start

    @torch.no_grad()
    def _validate(self, module: UNetFinetune) -> None:
        prompts = self.validation_prompts
        pipe = AudioLDM2Pipeline(**{**self.pipe.components, "unet": module.unet,
                                    "scheduler": DDIMScheduler.from_config(self.pipe.scheduler.config)})
        pipe.set_progress_bar_config(disable=True)
        module.unet.eval()
        device = self.ctx.settings.device
        # The trainable UNet is fp32 beside an fp16 frozen pipeline on GPU: autocast bridges them.
        with torch.autocast(device.type, dtype=self.pipe.dtype, enabled=device.type == "cuda"):
            audio = pipe(prompt=prompts, num_inference_steps=self.job.validation_steps, guidance_scale=3.5,
                         audio_length_in_s=10.24, generator=generators_for(self.job.seed, len(prompts), 1),
                         output_type="np").audios
        module.unet.train()
        folder = join(self.run_uri, "validation", checkpoints.step_dir_name(self.step))
        for index, (prompt, clip) in enumerate(zip(prompts, audio, strict=True)):
            uri = join(folder, f"{index:03d}-{slug(prompt)}.wav")
            self.ctx.storage.put_bytes(encode(clip, pipe.vocoder.config.sampling_rate, "wav"), uri, CONTENT_TYPES["wav"])
            self.validation.append({"step": self.step, "prompt": prompt, "uri": uri,
                                    "url": self.ctx.storage.presign(uri, self.job.output.url_expiry_s)})
