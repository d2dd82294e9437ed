"""The SD tasks from loaded networks: the denoiser on the prompt table, the decoder, the default rewards and
features, the evaluation plot, and the factories `make_task` (`sd`) and `make_random_task` (`sd-random`)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from sqdf_fast.memory import Checkpointed
from sqdf_fast.plots import save_grid
from sqdf_fast.rewards import AestheticHead, AestheticReward
from sqdf_fast.tasks import Task
from sqdf_fast.tasks.sd.lcm import (
    LCM_LORA_RANK,
    LCM_LORA_TARGETS,
    AdapterConsistency,
    load_consistency,
    load_lcm_lora,
    random_lora_state_dict,
)
from sqdf_fast.tasks.sd.pipeline import (
    CLIP_L14_VISION_CONFIG,
    RANDOM_WEIGHTS_SEED,
    Pipeline,
    fill_random,
    load_pipeline,
    random_module,
    random_pipeline,
    weights_dtype,
)
from sqdf_fast.tasks.sd.prompts import PromptTable, load_prompts, unet_eps

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]   # the authors' policy LoRA: all self- and cross-attention
DECODE_CHUNK = 8            # images per VAE call when nothing needs gradients (evaluation, rollouts)
POOLED_FEATURE_SIZE = 8     # features without a CLIP model: images average-pooled to 8x8

# docs/method.md §10.3 (T2I aesthetic SQDF) on one GPU, small batches
CONFIG_DEFAULTS = {"sample_steps": 50, "guidance": 5.0, "eta": 1.0, "alpha": 2.0, "gamma": 0.9, "resolution": 512,
                   "lr": 1e-3, "weight_decay": 1e-4, "lora_rank": 4, "lora_alpha": 4.0, "batch_size": 4,
                   "rollout_batch": 4, "replay_ratio": 1, "buffer_size": 256, "buffer_dtype": "bfloat16",
                   "steps": 200, "eval_per_class": 4, "log_every": 1, "checkpoint_every": 50}
METHOD_DEFAULTS = {"draft-kl": {"alpha": 0.035}}   # the authors' DRaFT+KL alpha (a sum over all T transitions)


def make_decoder(vae: AutoencoderKL) -> Callable[[Tensor], Tensor]:
    """latents -> images (B, 3, H, W) in [0, 1]: latents / scaling_factor (+ shift_factor), VAE decode, x / 2 + 1/2
    clamped (diffusers' postprocessing). Without gradients, large batches are decoded in chunks."""
    scaling, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0

    def decode_once(latents: Tensor) -> Tensor:
        z = latents / scaling + shift
        images = vae.decode(z.to(vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def decode(latents: Tensor) -> Tensor:
        if torch.is_grad_enabled() or latents.shape[0] <= DECODE_CHUNK:
            return decode_once(latents)
        return torch.cat([decode_once(part) for part in latents.split(DECODE_CHUNK)])
    return decode


def random_aesthetic_reward(vision_config: CLIPVisionConfig, generator: torch.Generator,
                            dtype: torch.dtype) -> AestheticReward:
    """The aesthetic reward's networks (a CLIP vision tower and the LAION head) with random weights: the cost of a
    real reward model for `sd-random`, meaningless as a score."""
    vision = random_module(lambda: CLIPVisionModelWithProjection(vision_config), generator, dtype)
    head = fill_random(AestheticHead(vision_config.projection_dim), generator).to(dtype)
    return AestheticReward(vision, head)


def colourfulness(images_01: Tensor, cond: Tensor) -> Tensor:
    """Hasler and Suesstrunk's colourfulness of images in [0, 1] (0 for grey images, about 0.2-0.3 for vivid
    photographs): sqrt(var(rg) + var(yb)) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2), rg = R - G, yb = (R + G) / 2 - B."""
    r, g, b = images_01.float().flatten(2).unbind(1)
    rg, yb = r - g, (r + g) / 2 - b
    spread = (rg.var(1) + yb.var(1) + 1e-8).sqrt()
    offset = (rg.mean(1).square() + yb.mean(1).square() + 1e-8).sqrt()
    return spread + 0.3 * offset


def pooled_features(images_01: Tensor) -> Tensor:
    """A cheap fixed image feature: the image average-pooled to 8x8, flattened (B, 3 * 64)."""
    return F.adaptive_avg_pool2d(images_01.float(), POOLED_FEATURE_SIZE).flatten(1)


def plot_samples(images: Tensor, cond: Tensor, per_class: int, path: Path, thumbnail: int = 128) -> None:
    """Up to 8 evaluation samples per prompt, one row per prompt, as thumbnails."""
    images = images.view(-1, per_class, *images.shape[1:])[:, :8].flatten(0, 1)
    if images.shape[-1] > thumbnail:
        images = F.interpolate(images.float(), size=(thumbnail, thumbnail), mode="bilinear", antialias=True)
    save_grid(images * 2 - 1, path, nrow=min(per_class, 8), scale=1)


def build_task(name: str, cfg, pipeline: Pipeline, reward_model: nn.Module | None = None,
               lcm_lora: dict[str, Tensor] | None = None) -> Task:
    """The task from loaded networks. reward_model: a default reward with an `embed` method (its embedding is then
    the metrics' feature); None: colourfulness and pooled features. The consistency model is cfg.consistency, else
    `lcm_lora` (a state dict) when given, else none (the method then uses the reference's Tweedie estimate).
    The reward runs through `Checkpointed` (cfg.checkpoint_reward), so a `--reward` put in its place by
    `sqdf_fast.tasks.build` is checkpointed too."""
    dtype = next(pipeline.unet.parameters()).dtype
    unet, vae = pipeline.unet, pipeline.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.resolution % factor:
        raise ValueError(f"resolution={cfg.resolution}: must be a multiple of the VAE's downsampling factor {factor}")
    table = PromptTable(pipeline.text_encoder, pipeline.tokenizer, *load_prompts(cfg.prompts), dtype)
    alphas = DDIMScheduler.from_config(pipeline.scheduler_config).alphas_cumprod
    eps = functools.partial(unet_eps, unet, table)   # (x, t, cond) -> epsilon of the task's UNet

    consistency = None
    if cfg.consistency is not None:
        consistency = load_consistency(cfg.consistency, unet, eps, table, alphas, dtype, cfg.guidance)
    elif lcm_lora is not None:
        load_lcm_lora(unet, lcm_lora, dtype)
        consistency = AdapterConsistency(unet, eps, alphas)

    if reward_model is not None:
        reward_model = reward_model.requires_grad_(False).eval()
        reward_fn, features = reward_model, reward_model.embed
    else:
        reward_fn, features = colourfulness, pooled_features

    def sample_conditions(n: int, generator: torch.Generator) -> Tensor:
        picks = torch.randint(0, table.train_rows.shape[0], (n,), generator=generator, device=generator.device)
        return table.train_rows[picks]

    latent = cfg.resolution // factor
    frozen = [table, vae] + [m for m in (consistency, reward_model) if isinstance(m, nn.Module)]
    return Task(
        name=name, unet=unet, eps=eps, scheduler_config=pipeline.scheduler_config,
        sample_shape=(unet.config.in_channels, latent, latent),
        sample_conditions=sample_conditions,
        null_condition=lambda cond: torch.full_like(cond, table.null_index),
        reward=Checkpointed(reward_fn, cfg.checkpoint_reward),
        decode=Checkpointed(make_decoder(vae), cfg.checkpoint_decoder),
        lora_targets=LORA_TARGETS, consistency=consistency, features=features, real_features=None,
        eval_conditions=lambda per_class: table.eval_rows.repeat_interleave(per_class),
        plot_samples=plot_samples, frozen=frozen, prompts=table.prompts,
    )


def make_task(cfg) -> Task:
    """--task sd --model PIPELINE_FOLDER [--consistency LCM_LORA]."""
    if cfg.model is None:
        raise ValueError("model: --task sd needs --model PATH, a local diffusers Stable Diffusion pipeline folder "
                         "(unet/, vae/, text_encoder/, tokenizer/, scheduler/); --task sd-random needs none")
    return build_task("sd", cfg, load_pipeline(cfg.model, weights_dtype(cfg)))


def make_random_task(cfg) -> Task:
    """--task sd-random: SD-1.5's architecture with random weights, a random rank-64 LCM-LoRA on LCM-LoRA's modules
    (unless --consistency names a real one) and a random CLIP ViT-L/14 reward (unless --reward replaces it)."""
    if cfg.model is not None:
        raise ValueError(f"model={cfg.model!r}: --task sd-random builds its own random weights; use --task sd")
    dtype = weights_dtype(cfg)
    pipeline = random_pipeline(dtype)
    generator = torch.Generator().manual_seed(RANDOM_WEIGHTS_SEED + 1)
    lcm_lora = None
    if cfg.consistency is None:
        lcm_lora = random_lora_state_dict(pipeline.unet, LCM_LORA_TARGETS, LCM_LORA_RANK, generator, scale=0.01)
    reward = None if cfg.reward is not None else random_aesthetic_reward(CLIPVisionConfig(**CLIP_L14_VISION_CONFIG),
                                                                         generator, dtype)
    return build_task("sd-random", cfg, pipeline, reward, lcm_lora)
