"""LoRA adapters on the tiny AudioLDM2 UNet and pipeline, for real (no mocks)."""

from __future__ import annotations

import functools
import re

from pathlib import Path

import pytest
import torch
from diffusers import AudioLDM2UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from torch import nn

from audioldm.adapters import (
    TARGET_MODULES,
    activate,
    adapter_names,
    adapter_state_dict,
    add_adapter,
    load_adapter,
    lora_config,
    remove_adapter,
    trainable_parameters,
)
from audioldm.errors import ModelError
from audioldm.loading import load_pipeline

PROMPT = "A dog barks in the rain"


def _unet(model_dir: Path, dtype: torch.dtype = torch.float32) -> AudioLDM2UNet2DConditionModel:
    return AudioLDM2UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", dtype=dtype)


@pytest.fixture
def unet(tiny_model_dir: Path) -> AudioLDM2UNet2DConditionModel:
    return _unet(tiny_model_dir)


def _inputs(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One UNet call's inputs in the pipeline's layout: latents, GPT-2 states (dim 16), T5 states (dim 32)."""
    generator = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(2, 8, 8, 8, generator=generator).to(dtype),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 8, 16, generator=generator).to(dtype),
        "encoder_hidden_states_1": torch.randn(2, 7, 32, generator=generator).to(dtype),
        "encoder_attention_mask_1": torch.tensor([[1] * 7, [1] * 5 + [0] * 2]),
    }


def _forward(unet: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return unet(**_inputs(dtype), return_dict=False)[0]


def _perturb(unet: nn.Module, name: str, seed: int) -> None:
    """LoRA B starts at zero (a fresh adapter is a no-op); give it random values so the adapter does something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in unet.named_parameters():
            if f".lora_B.{name}." in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def _state(unet: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in unet.state_dict().items()}


def _assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


@functools.lru_cache
def _saved_adapter(model_dir: Path, seed: int, rank: int) -> dict[str, torch.Tensor]:
    unet = _unet(model_dir)
    add_adapter(unet, "source", lora_config(rank=rank, alpha=rank))
    _perturb(unet, "source", seed)
    return adapter_state_dict(unet, "source")


def _trained_adapter(model_dir: Path, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """A saved adapter with non-trivial weights, as a fine-tuning job would leave it (cached; a fresh dict)."""
    return dict(_saved_adapter(model_dir, seed, rank))


def test_targets_every_attention_projection_including_cross_attention(unet: nn.Module) -> None:
    # Every Linear of every attention module, found without TARGET_MODULES.
    expected = {
        f"{path}.{child}"
        for path, module in unet.named_modules()
        if isinstance(module, Attention)
        for child, sub in module.named_modules()
        if isinstance(sub, nn.Linear)
    }
    # attn1 is self-attention, attn2 cross-attention (on GPT-2 or T5 states, or self in the first transformer).
    assert {re.sub(r".*\.attn[12]\.", "", path) for path in expected} == set(TARGET_MODULES)
    assert len(expected) == 96  # 12 transformer blocks x 2 attentions x 4 projections
    # The cross-attention on GPT-2 states has 16 input features, the one on T5 states 32: both are covered.
    assert {unet.get_submodule(path).in_features for path in expected} == {16, 32}

    add_adapter(unet, "a", lora_config(rank=4, alpha=4))
    wrapped = {path for path, module in unet.named_modules() if isinstance(module, LoraLayer)}
    assert wrapped == expected
    assert adapter_names(unet) == ["a"]


def test_active_adapter_changes_output_and_none_or_removal_restores_base_exactly(unet: nn.Module) -> None:
    base_state = _state(unet)
    base = _forward(unet)

    add_adapter(unet, "a", lora_config(rank=4, alpha=8))
    assert torch.equal(_forward(unet), base)  # added, not active
    activate(unet, "a")
    assert torch.equal(_forward(unet), base)  # active, but B is zero

    _perturb(unet, "a", seed=0)
    adapted = _forward(unet)
    assert not torch.allclose(adapted, base, atol=1e-3)

    activate(unet, None)
    assert torch.equal(_forward(unet), base)
    activate(unet, "a")
    assert torch.equal(_forward(unet), adapted)

    remove_adapter(unet, "a")  # while active
    assert adapter_names(unet) == []
    assert torch.equal(_forward(unet), base)
    # No peft wrapper is left behind: same modules, same state_dict keys and values as before.
    assert not any(isinstance(module, LoraLayer) for module in unet.modules())
    assert not hasattr(unet, "peft_config")
    _assert_same_state(_state(unet), base_state)


def test_lora_dropout_is_off_in_an_eval_unet(unet: nn.Module) -> None:
    add_adapter(unet, "a", lora_config(rank=4, alpha=4, dropout=0.5))
    _perturb(unet, "a", seed=0)
    activate(unet, "a")
    assert not unet.training
    assert torch.equal(_forward(unet), _forward(unet))


def test_state_dict_round_trip_under_another_name(tiny_model_dir: Path, unet: nn.Module) -> None:
    source = _unet(tiny_model_dir)
    add_adapter(source, "a", lora_config(rank=4, alpha=8))
    _perturb(source, "a", seed=0)
    activate(source, "a")
    expected = _forward(source)

    saved = adapter_state_dict(source, "a")
    assert len(saved) == 96 * 2
    assert all(".a." not in key and not key.endswith(".a") for key in saved)
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in saved.values())
    # Same keys and values as peft's own helper, so files are interchangeable with peft-saved adapters.
    peft_saved = get_peft_model_state_dict(source, adapter_name="a", save_embedding_layers=False)
    _assert_same_state(saved, peft_saved)
    # A copy: changing it leaves the model alone.
    next(iter(saved.values())).add_(1.0)
    assert torch.equal(_forward(source), expected)
    saved = adapter_state_dict(source, "a")

    base = _forward(unet)
    load_adapter(unet, "b", lora_config(rank=4, alpha=8), saved)
    assert adapter_names(unet) == ["b"]
    assert torch.equal(_forward(unet), base)  # loaded, not active yet
    activate(unet, "b")
    assert torch.equal(_forward(unet), expected)
    _assert_same_state(adapter_state_dict(unet, "b"), saved)


def test_switching_between_two_adapters(tiny_model_dir: Path, unet: nn.Module) -> None:
    weights = {"a": _trained_adapter(tiny_model_dir, seed=1), "b": _trained_adapter(tiny_model_dir, seed=2)}
    config = lora_config(rank=4, alpha=4)
    references = {}
    for name, state_dict in weights.items():
        single = _unet(tiny_model_dir)
        load_adapter(single, name, config, state_dict)
        activate(single, name)
        references[name] = _forward(single)
    assert not torch.allclose(references["a"], references["b"], atol=1e-3)

    base_state, base = _state(unet), _forward(unet)
    for name, state_dict in weights.items():
        load_adapter(unet, name, config, state_dict)
    assert adapter_names(unet) == ["a", "b"]
    for name in ["a", "b", None, "b", "a"]:
        activate(unet, name)
        assert torch.equal(_forward(unet), base if name is None else references[name]), name

    remove_adapter(unet, "a")  # the active one: none is active afterwards, "b" is not switched on
    assert adapter_names(unet) == ["b"]
    assert torch.equal(_forward(unet), base)
    activate(unet, "b")
    assert torch.equal(_forward(unet), references["b"])
    remove_adapter(unet, "b")
    _assert_same_state(_state(unet), base_state)


def test_mismatched_weights_are_refused_and_leave_the_unet_untouched(tiny_model_dir: Path, unet: nn.Module) -> None:
    base_state = _state(unet)
    rank4 = _trained_adapter(tiny_model_dir, seed=0, rank=4)

    with pytest.raises(ModelError, match="shape mismatch"):
        load_adapter(unet, "x", lora_config(rank=8, alpha=8), rank4)
    other_model = {key.replace("down_blocks.", "encoder.blocks."): value for key, value in rank4.items()}
    with pytest.raises(ModelError, match="missing key.*unexpected key"):
        load_adapter(unet, "x", lora_config(rank=4, alpha=4), other_model)
    partial = dict(list(rank4.items())[:-1])
    with pytest.raises(ModelError, match="1 missing key"):
        load_adapter(unet, "x", lora_config(rank=4, alpha=4), partial)
    poisoned = dict(rank4)
    poisoned[next(iter(poisoned))] = torch.full_like(next(iter(rank4.values())), float("nan"))
    with pytest.raises(ModelError, match="NaN"):
        load_adapter(unet, "x", lora_config(rank=4, alpha=4), poisoned)
    with pytest.raises(ModelError, match="cannot add LoRA adapter"):
        add_adapter(unet, "x", LoraConfig(r=4, target_modules=["q_proj"]))

    assert adapter_names(unet) == []
    assert not any(isinstance(module, LoraLayer) for module in unet.modules())
    _assert_same_state(_state(unet), base_state)

    load_adapter(unet, "x", lora_config(rank=4, alpha=4), rank4)  # the right config still loads
    with pytest.raises(ValueError, match="already"):
        add_adapter(unet, "x", lora_config(rank=4, alpha=4))
    for bad_name in ["", "a.b", "keys", "x" * 65]:
        with pytest.raises(ValueError, match="invalid adapter name"):
            add_adapter(unet, bad_name, lora_config(rank=4, alpha=4))
    for call in (lambda: activate(unet, "nope"), lambda: remove_adapter(unet, "nope")):
        with pytest.raises(ValueError, match="no adapter named 'nope'"):
            call()


def test_training_changes_only_the_chosen_adapter(tiny_model_dir: Path, unet: nn.Module) -> None:
    config = lora_config(rank=4, alpha=4, dropout=0.1)
    load_adapter(unet, "other", config, _trained_adapter(tiny_model_dir, seed=3))
    add_adapter(unet, "a", config)
    params = trainable_parameters(unet, "a")
    lora_a = {key for key, _ in unet.named_parameters() if ".lora_A.a." in key or ".lora_B.a." in key}
    assert len(params) == len(lora_a) == 96 * 2
    assert {key for key, p in unet.named_parameters() if p.requires_grad} == lora_a
    assert {id(p) for p in params} == {id(p) for key, p in unet.named_parameters() if key in lora_a}

    activate(unet, "a")  # activating keeps the trainable set as it is
    assert {key for key, p in unet.named_parameters() if p.requires_grad} == lora_a
    before = _state(unet)
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    target = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(unet(**_inputs(), return_dict=False)[0], target)
        loss.backward()
        optimizer.step()
    unet.eval()

    after = _state(unet)
    for key in before:
        if key in lora_a:
            assert not torch.equal(after[key], before[key]), f"{key} did not train"
        else:
            assert torch.equal(after[key], before[key]), f"{key} changed"


def test_float16_base_keeps_float32_adapter_weights(tiny_model_dir: Path) -> None:
    unet = _unet(tiny_model_dir, torch.float16)
    base = _forward(unet, torch.float16)
    add_adapter(unet, "a", lora_config(rank=4, alpha=4))
    assert {p.dtype for key, p in unet.named_parameters() if ".lora_" in key} == {torch.float32}
    assert {p.dtype for key, p in unet.named_parameters() if ".lora_" not in key} == {torch.float16}
    assert unet.dtype == torch.float16  # what the pipeline and diffusers read
    _perturb(unet, "a", seed=0)
    activate(unet, "a")
    adapted = _forward(unet, torch.float16)
    assert adapted.dtype == torch.float16 and torch.isfinite(adapted).all()
    assert not torch.equal(adapted, base)
    activate(unet, None)
    assert torch.equal(_forward(unet, torch.float16), base)
    # A float32 file loads into a float16 model's adapter the same way.
    saved = adapter_state_dict(unet, "a")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    remove_adapter(unet, "a")
    load_adapter(unet, "b", lora_config(rank=4, alpha=4), saved)
    activate(unet, "b")
    assert torch.equal(_forward(unet, torch.float16), adapted)


def test_pipeline_call_with_adapter(tiny_model_dir: Path) -> None:
    pipe = load_pipeline(tiny_model_dir, device="cpu", dtype=torch.float32)

    def generate() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        audio = pipe(PROMPT, num_inference_steps=2, audio_length_in_s=1.0, generator=generator, output_type="pt")
        return audio.audios

    base = generate()
    load_adapter(pipe.unet, "a", lora_config(rank=4, alpha=4), _trained_adapter(tiny_model_dir, seed=0))
    activate(pipe.unet, "a")
    adapted = generate()
    assert adapted.shape == base.shape
    # The random vocoder's audio is tiny (~1e-11), so compare relative to its scale.
    assert (adapted - base).abs().max() > 0.1 * base.abs().max()
    activate(pipe.unet, None)
    assert torch.equal(generate(), base)
    activate(pipe.unet, "a")
    assert torch.equal(generate(), adapted)
    remove_adapter(pipe.unet, "a")
    assert torch.equal(generate(), base)
