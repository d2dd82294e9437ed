"""The policy as a LoRA adapter on the base weights; the reference is the same weights with adapters off."""
from __future__ import annotations

import warnings
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

    A's random initialisation comes from `seed` without touching the global RNG.
    A model may already carry other, frozen adapters (a task's consistency LoRA, sqdf_fast.tasks.sd): afterwards
    the policy is the only active adapter in every layer and the only trainable parameters are its own."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft warns that a model with adapters gets another one: that is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=POLICY)
    params = [p for name, p in model.named_parameters() if f".{POLICY}." in name]
    if not params:
        raise ValueError(f"lora targets {targets} match no module of {type(model).__name__}")
    # peft's injection re-activates (and makes trainable) whatever adapters were active before: set the state
    # explicitly, then freeze everything but the policy
    activate_adapters(tuner_layers(model), [POLICY])
    model.requires_grad_(False)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def add_frozen_copy(model: nn.Module, name: str) -> None:
    """A second adapter `name` shaped like the policy's (same targets, rank and scale), frozen and inactive; its
    weights follow the policy's whenever `copy_policy_into(model, name)` runs (e.g. the previous round's model as
    the KL reference of the black-box loop)."""
    policy_layer = next(layer for layer in tuner_layers(model) if POLICY in layer.r)
    targets = [module_name for module_name, m in model.named_modules()   # exactly the policy's layers
               if isinstance(m, BaseTunerLayer) and POLICY in m.r]
    config = LoraConfig(r=policy_layer.r[POLICY], lora_alpha=policy_layer.lora_alpha[POLICY],
                        target_modules=targets, init_lora_weights=True)
    layers = tuner_layers(model)
    with _requires_grad_kept(layers), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, model, adapter_name=name)
    activate_adapters(tuner_layers(model), [POLICY])
    for param_name, p in model.named_parameters():
        if f".{name}." in param_name:
            p.data = p.data.float()
            p.requires_grad_(False)
    copy_policy_into(model, name)


def copy_policy_into(model: nn.Module, name: str) -> None:
    """Copy the policy adapter's weights into adapter `name` (in place)."""
    result = set_peft_model_state_dict(model, get_peft_model_state_dict(model, adapter_name=POLICY), adapter_name=name)
    if getattr(result, "unexpected_keys", []):
        raise ValueError(f"adapter {name!r} is not shaped like the policy: unexpected keys "
                         f"{result.unexpected_keys[:3]}")


def tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    """Every peft adapter layer of `model` (the layers whose active adapters `activate_adapters` sets)."""
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def _requires_grad_kept(layers: list[BaseTunerLayer]):
    """peft's set_adapter / enable_adapters also flip requires_grad (active adapters become trainable, disabled
    ones frozen); switching adapters for one forward must not change what the optimizer trains."""
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def activate_adapters(layers: list[BaseTunerLayer], names: list[str]) -> None:
    """Make `names` the active adapters of every layer (a layer without them falls through to its base layer);
    every requires_grad flag is kept (peft's set_adapter would make the active adapters trainable)."""
    with _requires_grad_kept(layers):
        for layer in layers:
            layer.set_adapter(names)


def has_adapter(model: nn.Module, name: str) -> bool:
    return any(name in getattr(layer, attr) for layer in tuner_layers(model) for attr in layer.adapter_layer_names)


@contextmanager
def only_adapter(model: nn.Module, name: str):
    """Run the model with adapter `name` alone active (e.g. a frozen consistency LoRA while the policy LoRA sits on
    the same layers); the previous active adapters and every requires_grad flag are restored on exit."""
    layers = tuner_layers(model)
    if not has_adapter(model, name):
        raise ValueError(f"adapter {name!r}: {type(model).__name__} has no such adapter")
    previous = [list(layer.active_adapters) for layer in layers]
    activate_adapters(layers, [name])
    try:
        yield model
    finally:
        with _requires_grad_kept(layers):
            for layer, names in zip(layers, previous):
                layer.set_adapter(names)


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model: every adapter layer falls through to its frozen base layer."""
    layers = tuner_layers(model)
    with _requires_grad_kept(layers):
        for layer in layers:
            layer.enable_adapters(False)
    try:
        yield model
    finally:
        with _requires_grad_kept(layers):
            for layer in layers:
                layer.enable_adapters(True)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=POLICY).items()}


def load_adapter_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    result = set_peft_model_state_dict(model, state, adapter_name=POLICY)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter weights do not fit the model: unexpected keys {unexpected[:3]}...")


def copy_adapter_in_place(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load policy adapter weights by copying INTO the existing parameters (`copy_`, cast to each parameter's dtype
    and device): every parameter keeps its storage, so a captured CUDA graph of the model (sqdf_fast.graphs) sees the
    new weights on its next replay. `state` has `adapter_state_dict`'s keys; ValueError on a missing or unexpected
    key or a shape mismatch (nothing is copied then)."""
    current = get_peft_model_state_dict(model, adapter_name=POLICY)   # tensors sharing the parameters' storage
    missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if missing or unexpected:
        raise ValueError(f"adapter weights do not fit the model: missing keys {missing[:3]}, unexpected keys "
                         f"{unexpected[:3]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(current[key].shape):
            raise ValueError(f"adapter weights do not fit the model: {key} has shape {tuple(value.shape)}, "
                             f"expected {tuple(current[key].shape)}")
    with torch.no_grad():
        for key, value in state.items():
            current[key].copy_(value)
