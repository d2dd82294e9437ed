"""The policy as a LoRA adapter on the base weights; the reference is the same weights with adapters off."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import (
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

POLICY = "policy"


def add_policy_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, seed: int) -> list[nn.Parameter]:
    """Attach a trainable float32 LoRA (B initialised to zero, so policy = base at the start); freeze the rest.

    A's random initialisation comes from `seed` without touching the global RNG."""
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=POLICY)
    params = [p for name, p in model.named_parameters() if f".{POLICY}." in name]
    if not params:
        raise ValueError(f"lora targets {targets} match no module of {type(model).__name__}")
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def _tuner_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model: every adapter layer falls through to its frozen base layer."""
    layers = _tuner_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=POLICY).items()}


def load_adapter_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    result = set_peft_model_state_dict(model, state, adapter_name=POLICY)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter weights do not fit the model: unexpected keys {unexpected[:3]}...")
