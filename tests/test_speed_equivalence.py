"""Speed must not change results silently.

At equal settings, the worker's generate path (`audioldm.generate.generate`, fed a job parsed like the
worker parses it) must give what a plain diffusers `AudioLDM2Pipeline` call gives with the same noise:
same scheduler, steps, guidance, seed. Checked on CPU with the tiny model, for DDIM (default quality)
and DPM-Solver++ (fast mode, against diffusers' own `DPMSolverMultistepScheduler`).

Tolerances are relative to the reference clip's peak (the tiny random model's audio is ~1e-10 in
amplitude, so absolute tolerances would be meaningless):
- one prompt, one candidate: same computation, same shapes -> equal to 1e-6 of the peak;
- several prompts in one batch: batched matmuls round differently -> 1e-4 of the peak. Holds for prompts
  as long (in T5 tokens) as the batch's longest, and for a shorter one too: each prompt is encoded
  alone (plain diffusers would pad it to the longest and give it different conditioning).

Also: gradient checkpointing must not change gradients (diffusers' stock checkpointing crashes on this
UNet; ours maps the arguments by name), and
the full-size architecture configs give the published parameter counts (counted on the meta
device, no weights), and `build_full_size` produces a directory the normal loader loads (checked on a
shrunken copy of the configs, so the test stays fast).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AudioLDM2Pipeline, DPMSolverMultistepScheduler

from audioldm.architecture import PUBLISHED_PARAMS, build_full_size, load_configs, parameter_counts
from audioldm.contract import parse_job
from audioldm.generate import generate
from audioldm.loading import load_pipeline
from audioldm.models import LoadedModel, resolve_model

STEPS = 3
DURATION_S = 0.64  # 16 latent frames: fast (the contract allows >= 0.5 s)
GUIDANCE = 3.5
SINGLE_RTOL = 1e-6
BATCH_RTOL = 1e-4


@pytest.fixture(scope="module")
def ours(worker) -> LoadedModel:
    model, _ = worker.models.get(resolve_model("tiny", worker.settings))
    return model


@pytest.fixture(scope="module")
def plain(tiny_model_dir: Path) -> AudioLDM2Pipeline:
    """A separate, plain diffusers pipeline: its own weights copy and the checkpoint's own DDIM scheduler."""
    return load_pipeline(tiny_model_dir, "cpu", torch.float32)


def _ours(model: LoadedModel, prompts: list[str], seed: int, scheduler: str) -> list[np.ndarray]:
    job = parse_job({"task": "generate", "prompt": prompts, "duration_s": DURATION_S, "steps": STEPS,
                     "guidance_scale": GUIDANCE, "candidates": 1, "seed": seed, "scheduler": scheduler})
    return [clip.audio for clip in generate(model, job)]


def _plain(pipe: AudioLDM2Pipeline, prompt: str, seed: int) -> np.ndarray:
    audio = pipe(prompt, audio_length_in_s=DURATION_S, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                 generator=torch.Generator().manual_seed(seed), output_type="np").audios[0]
    return np.clip(audio, -1.0, 1.0)  # the worker clamps to the valid range before encoding


def _assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    assert actual.shape == expected.shape
    peak = float(np.abs(expected).max())
    assert peak > 0 and np.isfinite(actual).all()
    error = float(np.abs(actual - expected).max())
    assert error <= rtol * peak, f"max |diff| {error:.3g} > {rtol:g} x peak {peak:.3g}"


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp"])
def test_single_prompt_matches_plain_diffusers(ours: LoadedModel, plain: AudioLDM2Pipeline, scheduler: str) -> None:
    original = plain.scheduler
    if scheduler == "dpmpp":
        # What a diffusers user would write; its default algorithm is DPM-Solver++ (what our "dpmpp" means).
        plain.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
        assert plain.scheduler.config.algorithm_type == "dpmsolver++"
    try:
        expected = _plain(plain, "rain on a tin roof", seed=11)
    finally:
        plain.scheduler = original
    (actual,) = _ours(ours, ["rain on a tin roof"], seed=11, scheduler=scheduler)
    _assert_close(actual, expected, SINGLE_RTOL)


# Two prompts of 15 T5 tokens (the batch's longest: no padding) and one of 10 (padded) with the tiny tokenizer.
BATCH = ["rain on a tin roof", "wind in the trees", "a dog barks"]


@pytest.fixture(scope="module")
def batch_vs_alone(ours: LoadedModel, plain: AudioLDM2Pipeline) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prompt i's clip from one 3-prompt job, the plain pipeline's clip for prompt i alone with seed + i)."""
    lengths = [len(plain.tokenizer_2(prompt).input_ids) for prompt in BATCH]
    assert lengths[0] == lengths[1] == max(lengths) > lengths[2], lengths
    batched = _ours(ours, BATCH, seed=3, scheduler="ddim")
    return [(batched[index], _plain(plain, prompt, seed=3 + index)) for index, prompt in enumerate(BATCH)]


def test_batched_prompts_of_the_longest_token_length_match_each_alone(batch_vs_alone) -> None:
    for actual, expected in batch_vs_alone[:2]:
        _assert_close(actual, expected, BATCH_RTOL)


def test_batched_shorter_prompt_matches_it_alone(batch_vs_alone) -> None:
    actual, expected = batch_vs_alone[2]
    _assert_close(actual, expected, BATCH_RTOL)


def test_full_size_configs_give_published_parameter_counts() -> None:
    counts = parameter_counts("audioldm2")  # meta device: no memory, about a second
    published = PUBLISHED_PARAMS["audioldm2"]
    assert abs(counts["unet"] / published["unet"] - 1) < 0.005  # 346.9 M vs 347 M
    assert abs(counts["total"] / published["total"] - 1) < 0.01  # 1.118 B vs 1.12 B
    assert abs(counts["text_encoder_2"] / published["text_encoder_2"] - 1) < 0.005  # flan-t5-large encoder
    assert abs(counts["language_model"] / published["language_model"] - 1) < 0.005  # GPT-2 base
    assert counts["total"] == sum(value for name, value in counts.items() if name != "total")


def _shrink(configs: dict[str, dict]) -> dict[str, dict]:
    """The audioldm2 configs with every width and depth cut down; shapes stay consistent across components."""
    c = json.loads(json.dumps(configs))
    c["unet"].update(block_out_channels=[32, 32, 32, 32], layers_per_block=1, attention_head_dim=2,
                     cross_attention_dim=[[None, 16, 32]] * 4)
    c["vae"].update(block_out_channels=[32, 32, 32], layers_per_block=1)
    c["text_encoder"]["projection_dim"] = 16
    c["text_encoder"]["text_config"].update(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=37, projection_dim=16)
    c["text_encoder"]["audio_config"].update(
        spec_size=16, window_size=2, num_mel_bins=8, hidden_size=32, patch_embeds_hidden_size=16, patch_size=2,
        patch_stride=[2, 2], depths=[1, 1], num_attention_heads=[2, 2], projection_dim=16)
    c["feature_extractor"].update(feature_size=8, hop_length=16_000)  # 31 frames: fits spec_size 16
    c["text_encoder_2"].update(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2)
    c["language_model"].update(n_embd=16, n_layer=2, n_head=2)
    c["projection_model"].update(text_encoder_dim=16, text_encoder_1_dim=32, langauge_model_dim=16)
    c["vocoder"]["upsample_initial_channel"] = 32
    return c


def test_build_full_size_saves_a_loadable_hub_layout(tmp_path: Path) -> None:
    configs_dir = tmp_path / "configs"
    configs_dir.mkdir()
    for name, config in _shrink(load_configs("audioldm2")).items():
        (configs_dir / f"{name}.json").write_text(json.dumps(config))
    model_dir = build_full_size(tmp_path / "model", preset=configs_dir)

    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["language_model"] == ["transformers", "GPT2Model"]  # as on the hub
    assert (model_dir / "FULL_SIZE_MODEL.txt").is_file()
    pipe = load_pipeline(model_dir, "cpu", torch.float32)
    assert pipe.tokenizer.model_max_length == 512 and pipe.tokenizer_2.model_max_length == 128
    assert pipe.language_model.config.max_new_tokens == 8
    assert pipe.vae_scale_factor == 4 and pipe.vocoder.config.sampling_rate == 16_000
    audio = pipe("rain on a tin roof", audio_length_in_s=1.28, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").audios
    assert audio.shape == (1, int(1.28 * 16_000)) and np.isfinite(audio).all()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir: Path) -> None:
    from diffusers import AudioLDM2UNet2DConditionModel

    from audioldm.training import checkpointed_call

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 8, 16, 16, generator=generator)
    gpt2, t5 = torch.randn(2, 8, 16, generator=generator), torch.randn(2, 12, 32, generator=generator)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0  # T5 padding, as in any batch of captions of different lengths
    grads = []
    for checkpointing in (False, True):
        unet = AudioLDM2UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").train()
        if checkpointing:
            # What audioldm.finetune_job does: diffusers' stock function crashes on this UNet.
            unet.enable_gradient_checkpointing(checkpointed_call)
        out = unet(sample, torch.tensor([10, 900]), encoder_hidden_states=gpt2, encoder_hidden_states_1=t5,
                   encoder_attention_mask_1=mask, return_dict=False)[0]
        out.pow(2).mean().backward()
        grads.append(torch.cat([param.grad.flatten() for param in unet.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
