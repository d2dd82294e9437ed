"""The consistency model of the SD tasks: an LCM-LoRA as the frozen adapter "lcm" on the task's own UNet (run alone,
conditional branch only), or a full LCM UNet folder as a separate frozen UNet; and random LoRA weights in diffusers'
format for `sd-random` and the tests."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import Tensor, nn

from sqdf_fast.adapters import POLICY, activate_adapters, only_adapter, tuner_layers
from sqdf_fast.consistency import ConsistencyModel, one_step_x0
from sqdf_fast.tasks.sd.pipeline import weights_variant
from sqdf_fast.tasks.sd.prompts import PromptTable, unet_eps

LCM = "lcm"   # the consistency adapter's name on the task's UNet
# the modules LCM-LoRA (latent-consistency/lcm-lora-sdv1-5) adapts, for the random stand-in of `sd-random`
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
LCM_LORA_RANK = 64


def random_lora_state_dict(unet: nn.Module, targets: list[str], rank: int, generator: torch.Generator,
                           scale: float = 1.0) -> dict[str, Tensor]:
    """Random LoRA weights for every Linear / Conv2d whose name ends with a target, in diffusers' key format
    (`unet.<module>.lora_A.weight` (rank, in[, k, k]), `unet.<module>.lora_B.weight` (out, rank[, 1, 1])), which
    `StableDiffusionPipeline.load_lora_weights` and `load_lcm_lora` accept. The update B A has per-output standard
    deviation about `scale` times that of a unit-variance input."""
    state = {}
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, nn.Linear):
            a_shape, b_shape = (rank, module.in_features), (module.out_features, rank)
        elif isinstance(module, nn.Conv2d):
            a_shape, b_shape = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
        else:
            continue
        fan_in = math.prod(a_shape[1:])
        state[f"unet.{name}.lora_A.weight"] = torch.randn(a_shape, generator=generator) / math.sqrt(fan_in)
        state[f"unet.{name}.lora_B.weight"] = torch.randn(b_shape, generator=generator) * scale / math.sqrt(rank)
    if not state:
        raise ValueError(f"lora targets {targets} match no Linear or Conv2d of {type(unet).__name__}")
    return state


def load_lcm_lora(unet: UNet2DConditionModel, source: str | Path | dict[str, Tensor], dtype: torch.dtype,
                  what: str = "consistency") -> None:
    """Add an LCM-LoRA to `unet` as the frozen adapter "lcm": a LoRA safetensors file (diffusers or kohya keys, as
    diffusers' load_lora_weights reads them), a folder holding pytorch_lora_weights.safetensors, or a state dict.
    Afterwards no adapter is active (the plain base model) until `only_adapter(unet, "lcm")` or the policy is added."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    if isinstance(source, dict):
        location, kwargs = source, {}
    else:
        path = Path(source)
        folder, name = (path, "pytorch_lora_weights.safetensors") if path.is_dir() else (path.parent, path.name)
        if not (folder / name).is_file():
            raise ValueError(f"{what}={str(source)!r}: no {name} there")
        location, kwargs = str(folder), {"weight_name": name, "local_files_only": True}
    try:
        state, network_alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
            location, return_lora_metadata=True, **kwargs)
        unet_keys = [k for k in state if k.startswith("unet.")]
        if not unet_keys:
            raise ValueError("it holds no UNet LoRA weights (keys unet.* or lora_unet_*)")
        unet.load_lora_adapter(state, prefix="unet", network_alphas=network_alphas, adapter_name=LCM,
                               metadata=metadata, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ValueError(f"{what}={str(source) if not isinstance(source, dict) else 'state dict'!r}: not a LoRA "
                         f"for this UNet: {err}") from err
    loaded = [p for name, p in unet.named_parameters() if f".{LCM}." in name]
    if len(loaded) != len(unet_keys):   # diffusers only warns about weights it could not place
        raise ValueError(f"{what}={str(source)!r}: {len(unet_keys) - len(loaded)} of its {len(unet_keys)} UNet LoRA "
                         "tensors fit no layer of this UNet (a LoRA for another architecture?)")
    for p in loaded:   # frozen, stored like the base weights
        p.requires_grad_(False)
        p.data = p.data.to(dtype)
    # the policy's slot: until it exists, layers run their base weights
    activate_adapters(tuner_layers(unet), [POLICY])


class AdapterConsistency(nn.Module):
    """The consistency model as the frozen adapter "lcm" on the task's own UNet: f(x, t) = c_skip x + c_out x0_hat
    with the UNet's epsilon at timestep t with only "lcm" active, conditional branch only (LCM-LoRA is distilled
    with guidance folded in, so the authors' guidance-1 doubled batch was the conditional branch at twice the cost).

    t is t_{j+1}, the action's own timestep; the authors look up the nearest LCM timestep instead (2 steps off
    everywhere, 18 at t = 1; docs/method.md §9.5), which we do not replicate.
    `eps(x, t, cond)` is the task's epsilon of `unet`. The UNet is held by reference, not registered as a submodule:
    the task's frozen modules hold no second copy of it, and freezing or moving this module never touches the
    policy."""

    def __init__(self, unet: nn.Module, eps: Callable[[Tensor, Tensor, Tensor], Tensor], alphas_cumprod: Tensor,
                 adapter: str = LCM):
        super().__init__()
        self.__dict__["unet"] = unet
        self.eps, self.adapter = eps, adapter
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        with only_adapter(self.unet, self.adapter):
            eps = self.eps(x, t, cond)
        return one_step_x0(x, eps, t, self.alphas_cumprod)


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """LCM's sinusoidal embedding of the guidance scale (its argument is w - 1), as diffusers'
    LatentConsistencyModelPipeline builds it for UNets with time_cond_proj_dim."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0)
                                                                                          / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * frequencies[None, :]
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(embedding, (0, 1)) if dim % 2 else embedding


def load_consistency(source: str, unet: UNet2DConditionModel, eps: Callable[[Tensor, Tensor, Tensor], Tensor],
                     prompts: PromptTable, alphas_cumprod: Tensor, dtype: torch.dtype, guidance: float) -> nn.Module:
    """`--consistency`: an LCM-LoRA (file, or folder with pytorch_lora_weights.safetensors) as the adapter "lcm" on
    `unet` (whose epsilon is `eps(x, t, cond)`); or a full LCM UNet folder (a UNet folder, or a pipeline folder with
    unet/) as a separate frozen UNet conditioned on `prompts`, given the policy's guidance through its w-embedding
    when it has one (LCM-Dreamshaper)."""
    path = Path(source)
    if path.is_file() or (path / "pytorch_lora_weights.safetensors").is_file():
        load_lcm_lora(unet, path, dtype)
        return AdapterConsistency(unet, eps, alphas_cumprod)
    folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise ValueError(f"consistency={source!r}: neither an LCM-LoRA (a .safetensors file, or a folder with "
                         "pytorch_lora_weights.safetensors) nor a UNet folder (config.json) nor a pipeline folder "
                         "(unet/)")
    try:
        lcm_unet = UNet2DConditionModel.from_pretrained(
            folder, local_files_only=True, variant=weights_variant(folder, "diffusion_pytorch_model"),
            torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ValueError(f"consistency={source!r}: cannot load the UNet: {err}") from err
    if lcm_unet.config.cross_attention_dim != unet.config.cross_attention_dim:
        raise ValueError(f"consistency={source!r}: cross_attention_dim {lcm_unet.config.cross_attention_dim} does "
                         f"not match the model's {unet.config.cross_attention_dim}")
    lcm_unet = lcm_unet.requires_grad_(False).eval()
    w_dim = lcm_unet.config.time_cond_proj_dim

    def lcm_eps(net: nn.Module, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        w = None if w_dim is None else guidance_embedding(torch.full_like(t, guidance - 1.0, dtype=torch.float32),
                                                          w_dim).to(dtype)
        return unet_eps(net, prompts, x, t, cond, timestep_cond=w)

    return ConsistencyModel(lcm_unet, lcm_eps, alphas_cumprod).requires_grad_(False).eval()
