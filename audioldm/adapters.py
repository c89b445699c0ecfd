"""LoRA adapters on a warm, shared AudioLDM2 UNet, driven through peft directly.

`AudioLDM2UNet2DConditionModel` lacks diffusers' `PeftAdapterMixin` (no `add_adapter`/`set_adapters`) and the
pipeline has no `load_lora_weights`, so this module injects peft LoRA layers itself and manages them layer by layer.

Semantics chosen for a UNet that serves many jobs:
- Adding or loading an adapter never changes what is active: it stays inactive until `activate(unet, name)`.
- `activate(unet, None)` gives the base model's output bit for bit (the LoRA branch is skipped, not zeroed).
- `remove_adapter` unwraps a layer once its last adapter is gone, so the UNet's modules and state_dict are the
  base model's again (same keys, same Parameter objects).
- Only `trainable_parameters` changes `requires_grad`; adding, loading and activating leave it alone.
- Adapter weights are kept in float32 even on a float16/bfloat16 base (as peft's `PeftModel` does by default):
  peft casts the layer input to the adapter's dtype and the sum back to the base dtype, and AdamW on fp16
  parameters would lose small updates.

Adapter state dicts use peft's checkpoint keys without the adapter name
(`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`), so they load under any name and
match what `peft.utils.get_peft_model_state_dict` writes. They are built structurally from the LoRA layers
rather than with peft's helpers, whose name filter drops keys when another adapter's name equals a module path
component (an adapter named "0" or "attn1" would hide every "….0.…" key).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import cast_adapter_dtype
from torch import nn

from audioldm.errors import ModelError

# Every attention projection of the UNet: self-attention (attn1) and the cross-attentions (attn2) on the GPT-2
# and T5 states. `to_out.0` is the Linear inside the `to_out` ModuleList (`to_out.1` is a Dropout).
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]

# Adapter names become nn.ModuleDict keys and parts of parameter names: no dots, nothing exotic.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")

# The per-adapter containers of a LoRA layer holding weights; plain LoRA only uses lora_A and lora_B.
_WEIGHT_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def lora_config(rank: int, alpha: float, dropout: float = 0.0) -> LoraConfig:
    """A LoRA config on the UNet's attention projections (B starts at zero, so a new adapter is a no-op)."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(TARGET_MODULES), bias="none"
    )


def _lora_layers(unet: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for path, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            yield path, module


def adapter_names(unet: nn.Module) -> list[str]:
    """Names of the adapters on `unet`, sorted."""
    return sorted(getattr(unet, "peft_config", {}))


def _check_name(name: str) -> None:
    # ModuleDict refuses keys that are attributes of ModuleDict ("keys", "training", ...).
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name) or hasattr(nn.ModuleDict(), name):
        raise ValueError(f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-'")


def _require(unet: nn.Module, name: str) -> None:
    if name not in adapter_names(unet):
        raise ValueError(f"no adapter named {name!r} on this UNet (have: {adapter_names(unet)})")


def _active(unet: nn.Module) -> list[str]:
    """The adapters active on `unet` (the same on every layer, since only this module changes them)."""
    for _, layer in _lora_layers(unet):
        return list(layer.active_adapters)
    return []


def _set_active(unet: nn.Module, names: list[str]) -> None:
    """Activate `names` on every LoRA layer without touching requires_grad (peft's set_adapter does)."""
    for _, layer in _lora_layers(unet):
        flags = [(p, p.requires_grad) for p in layer.parameters()]
        layer.set_adapter(list(names))
        for param, flag in flags:
            param.requires_grad_(flag)


def _adapter_params(unet: nn.Module, name: str) -> Iterator[tuple[str, nn.Parameter]]:
    """(checkpoint key, parameter) of adapter `name`, keys without the adapter name, as peft saves them."""
    for path, layer in _lora_layers(unet):
        for container in _WEIGHT_CONTAINERS:
            entries = getattr(layer, container, None)
            if entries is None or name not in entries:
                continue
            entry = entries[name]
            if isinstance(entry, nn.Parameter):  # ParameterDict entries (embedding LoRA)
                yield f"{path}.{container}", entry
            else:
                for suffix, param in entry.named_parameters():
                    yield f"{path}.{container}.{suffix}", param


def add_adapter(unet: nn.Module, name: str, config: LoraConfig) -> None:
    """Inject a new, inactive adapter `name` into `unet`.

    Raises ValueError for a bad or already used name, ModelError when `config` matches no layer of this UNet.
    """
    _check_name(name)
    if name in adapter_names(unet):
        raise ValueError(f"an adapter named {name!r} is already on this UNet; remove it first or pick another name")
    active = _active(unet)
    grads = [(p, p.requires_grad) for p in unet.parameters()]
    # peft may rewrite the config (e.g. target_modules); keep the caller's intact and give each adapter its own.
    config = copy.deepcopy(config)
    try:
        with warnings.catch_warnings():
            # Expected from the second adapter on: peft warns that the model already has a `peft_config`.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(config, unet, adapter_name=name)
    except Exception as error:
        _discard(unet, name)
        raise ModelError(f"cannot add LoRA adapter {name!r} to this UNet: {error}") from error
    cast_adapter_dtype(unet, adapter_name=name)  # fp16/bf16 base -> fp32 adapter weights, see module docstring
    # peft makes the new adapter the only active one and freezes the base; undo both (see module docstring).
    _set_active(unet, active)
    for param, flag in grads:
        param.requires_grad_(flag)
    for param in dict(_adapter_params(unet, name)).values():
        param.requires_grad_(False)
    # New modules (the LoRA dropout) start in training mode; an eval UNet must not drop out at inference.
    for _, layer in _lora_layers(unet):
        layer.train(unet.training)


def adapter_state_dict(unet: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The weights of adapter `name`: CPU, contiguous copies, keys independent of the adapter name."""
    _require(unet, name)
    return {key: param.detach().to("cpu", copy=True).contiguous() for key, param in _adapter_params(unet, name)}


def _check_state_dict(expected: dict[str, nn.Parameter], state_dict: dict[str, torch.Tensor]) -> None:
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong_shape = [
        f"{key}: file {tuple(getattr(state_dict[key], 'shape', ()))}, model {tuple(param.shape)}"
        for key, param in expected.items()
        if key in state_dict
        and (not isinstance(state_dict[key], torch.Tensor) or state_dict[key].shape != param.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es), e.g. {wrong_shape[:3]}")
    if problems:
        raise ModelError(
            "LoRA adapter weights do not fit this model and adapter config (trained on another base model, "
            "or with another rank or target modules?): " + "; ".join(problems)
        )


def load_adapter(unet: nn.Module, name: str, config: LoraConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Inject adapter `name` (inactive) and load its weights strictly.

    Raises ModelError, leaving `unet` as it was, when keys are missing or unexpected or shapes differ.
    """
    add_adapter(unet, name, config)
    try:
        expected = dict(_adapter_params(unet, name))
        _check_state_dict(expected, state_dict)
        with torch.no_grad():
            for key, param in expected.items():
                value = state_dict[key]
                if not value.is_floating_point():
                    raise ModelError(f"LoRA adapter weight {key} is not floating point ({value.dtype})")
                if not torch.isfinite(value).all():  # would turn every generation into NaN noise
                    raise ModelError(f"LoRA adapter weight {key} holds NaN or infinite values")
                param.copy_(value)  # casts to the adapter's dtype and device
    except BaseException:
        remove_adapter(unet, name)
        raise


def activate(unet: nn.Module, name: str | None) -> None:
    """Make exactly adapter `name` active, or none (`None`: the base model's output, bit for bit)."""
    if name is not None:
        _require(unet, name)
    _set_active(unet, [] if name is None else [name])


def _discard(unet: nn.Module, name: str) -> None:
    """Delete adapter `name` wherever it is, then unwrap the layers left without adapters."""
    active = [n for n in _active(unet) if n != name]
    grads = [(p, p.requires_grad) for p in unet.parameters()]
    for path, layer in list(_lora_layers(unet)):
        # Deactivate first: deleting an active adapter makes peft activate another one (with a warning).
        layer.set_adapter(active)
        layer.delete_adapter(name)
        if not layer.lora_A and not layer.lora_embedding_A:
            # peft leaves the empty wrapper behind; put the original module back so the state_dict keys and
            # forward are the base model's again.
            parent_path, _, child = path.rpartition(".")
            setattr(unet.get_submodule(parent_path), child, layer.get_base_layer())
    for param, flag in grads:  # set_adapter above changes requires_grad; keep the caller's
        param.requires_grad_(flag)
    configs = getattr(unet, "peft_config", None)
    if configs is not None:
        configs.pop(name, None)
        if not configs:
            del unet.peft_config


def remove_adapter(unet: nn.Module, name: str) -> None:
    """Delete adapter `name`; once none remain, the UNet's modules and state_dict are the base model's."""
    _require(unet, name)
    _discard(unet, name)


def trainable_parameters(unet: nn.Module, name: str) -> list[nn.Parameter]:
    """Freeze everything but adapter `name`'s LoRA weights, and return those (for the optimizer).

    Training also needs `activate(unet, name)` (and `unet.train()` for the LoRA dropout).
    """
    _require(unet, name)
    unet.requires_grad_(False)
    params = [param for _, param in _adapter_params(unet, name)]
    for param in params:
        param.requires_grad_(True)
    return params
