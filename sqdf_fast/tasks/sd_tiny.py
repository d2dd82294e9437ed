"""A tiny Stable-Diffusion-style pipeline built in memory from configs (random weights, nothing downloaded): the
networks of the tests' tiny pipeline folders (tests/sd_fixtures.py writes them to disk) and of `bench/rollout.py
--tiny`. 2-level UNet (32, 64 channels) with cross-attention width 32 on 8x8 latents, a 4-level VAE (64 px images),
a 2-layer CLIP text encoder on the byte-level tokenizer, SD's DDIM schedule."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sqdf_fast.tasks.sd import SD_SCHEDULER_CONFIG, Pipeline, build_task, byte_level_tokenizer, byte_level_vocab

TINY_RESOLUTION = 64
TINY_LATENT = 8
TINY_UNET_CONFIG = dict(
    sample_size=TINY_LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)
TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
    sample_size=TINY_RESOLUTION, scaling_factor=0.18215,
)
TINY_TEXT_CONFIG = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=32, projection_dim=32, hidden_act="quick_gelu")


def tiny_networks(seed: int = 0) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """(unet, vae, text_encoder) with random weights from `seed`, without touching the global RNG."""
    vocab = byte_level_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        text_config = CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                                     eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
                                     **TINY_TEXT_CONFIG)
        text_encoder = CLIPTextModel(text_config)
    return unet, vae, text_encoder


def tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> Pipeline:
    """The tiny pipeline as `sqdf_fast.tasks.sd.build_task` takes it (frozen, eval mode, in `dtype`)."""
    networks = tiny_networks(seed)   # built in float32: cast only when asked (diffusers warns on any dtype cast)
    unet, vae, text_encoder = ((m if dtype == torch.float32 else m.to(dtype)).requires_grad_(False).eval()
                               for m in networks)
    tokenizer = byte_level_tokenizer()
    tokenizer.model_max_length = TINY_TEXT_CONFIG["max_position_embeddings"]
    return Pipeline(unet, vae, text_encoder, tokenizer, dict(SD_SCHEDULER_CONFIG))


def tiny_task(cfg, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The `sd` task on the tiny pipeline (colourfulness reward, no consistency model); cfg.resolution should be
    TINY_RESOLUTION (8x8 latents)."""
    return build_task("sd-tiny", cfg, tiny_pipeline(seed, dtype))
