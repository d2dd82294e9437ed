"""Stable Diffusion pipelines: the parts the task uses, loaded from a local diffusers folder (with a check that
names what the folder lacks) or built with SD-1.5's architecture and seeded random weights (`sd-random`)."""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sqdf_fast.tasks.sd.prompts import byte_level_tokenizer

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
RANDOM_WEIGHTS_SEED = 0     # sd-random's networks are the same in every run, whatever --seed is

# ---- SD-1.5 architecture (sd-random) ----------------------------------------------------------------------------
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
)
# CLIP ViT-L/14: the text tower SD-1.x conditions on, and the image tower of the aesthetic predictor
CLIP_L14_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
CLIP_L14_VISION_CONFIG = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
    image_size=224, projection_dim=768, hidden_act="quick_gelu",
)


class Pipeline(NamedTuple):
    """The parts of a Stable Diffusion pipeline the task uses (the text encoder only while it is built)."""
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict      # DDIMScheduler's own keys only


def weights_dtype(cfg) -> torch.dtype:
    """cfg.weights_dtype; auto: bfloat16 on CUDA (docs/method.md §10.3), float32 on the CPU."""
    if cfg.weights_dtype != "auto":
        return getattr(torch, cfg.weights_dtype)
    on_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    return torch.bfloat16 if on_cuda else torch.float32


# ---- loading -----------------------------------------------------------------------------------------------------
def weight_files(folder: Path, stems: tuple[str, ...]) -> list[Path]:
    """The weight files (safetensors, bin, or their index) in `folder` whose names start with one of `stems`."""
    return [p for stem in stems for p in folder.glob(f"{stem}*") if p.suffix in (".safetensors", ".bin", ".json")
            and p.name != "config.json"]


def weights_variant(folder: Path, stem: str) -> str | None:
    """'fp16' when a folder has only fp16-variant weights (diffusion_pytorch_model.fp16.safetensors and alike)."""
    if any((folder / f"{stem}{ext}").is_file() for ext in (".safetensors", ".bin", ".safetensors.index.json")):
        return None
    return "fp16" if any(folder.glob(f"{stem}.fp16.*")) else None


def check_pipeline_folder(path: str | Path) -> Path:
    """ValueError naming exactly what a diffusers Stable Diffusion pipeline folder lacks."""
    root = Path(path)
    layout = "a diffusers Stable Diffusion pipeline folder has unet/, vae/, text_encoder/, tokenizer/, scheduler/"
    if not root.is_dir():
        raise ValueError(f"model={str(path)!r}: no such folder ({layout})")
    missing = [name + "/" for name in SUBFOLDERS if not (root / name).is_dir()]
    if missing:
        raise ValueError(f"model={str(path)!r}: no {', '.join(missing)} folder ({layout})")
    needs = {
        "unet": (("config.json",), ("diffusion_pytorch_model",)),
        "vae": (("config.json",), ("diffusion_pytorch_model",)),
        "text_encoder": (("config.json",), ("model", "pytorch_model")),
        "scheduler": (("scheduler_config.json",), ()),
    }
    for name, (files, weight_stems) in needs.items():
        for file in files:
            if not (root / name / file).is_file():
                raise ValueError(f"model={str(path)!r}: {name}/ has no {file}")
        if weight_stems and not weight_files(root / name, weight_stems):
            raise ValueError(f"model={str(path)!r}: {name}/ has no weights ({weight_stems[0]}.safetensors or .bin)")
    tokenizer = root / "tokenizer"
    if not ((tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file()
            or (tokenizer / "tokenizer.json").is_file()):
        raise ValueError(f"model={str(path)!r}: tokenizer/ has neither vocab.json + merges.txt nor tokenizer.json")
    return root


def ddim_config(raw: dict, where: str) -> dict:
    """The keys of a scheduler config that DDIMScheduler takes (SD ships a PNDM config with the same betas)."""
    accepted = set(inspect.signature(DDIMScheduler.__init__).parameters) - {"self"}
    config = {k: v for k, v in raw.items() if k in accepted}
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"{where}: prediction_type={config['prediction_type']!r}; only epsilon-prediction models "
                         "are supported (e.g. SD 1.x, SD 2.x base at 512 px, not the 768 px v-prediction model)")
    return config


def load_pipeline(path: str | Path, dtype: torch.dtype) -> Pipeline:
    """Each component of a local pipeline folder with its own from_pretrained, offline, frozen, in `dtype`."""
    root = check_pipeline_folder(path)

    def load(name: str, loader: Callable, **kwargs):
        try:
            return loader(root / name, local_files_only=True, **kwargs)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"model={str(path)!r}: cannot load {name}/: {type(err).__name__}: {err}") from err

    stem = "diffusion_pytorch_model"
    unet = load("unet", UNet2DConditionModel.from_pretrained, variant=weights_variant(root / "unet", stem),
                torch_dtype=dtype)
    vae = load("vae", AutoencoderKL.from_pretrained, variant=weights_variant(root / "vae", stem), torch_dtype=dtype)
    text_encoder = load("text_encoder", CLIPTextModel.from_pretrained,
                        variant=weights_variant(root / "text_encoder", "model"))
    tokenizer = load("tokenizer", CLIPTokenizer.from_pretrained)
    try:
        raw = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"model={str(path)!r}: scheduler/scheduler_config.json is not JSON: {err}") from err
    scheduler_config = ddim_config(raw, f"model={str(path)!r}: scheduler/scheduler_config.json")
    if unet.config.addition_embed_type is not None:
        raise ValueError(f"model={str(path)!r}: unet/ has addition_embed_type="
                         f"{unet.config.addition_embed_type!r} (an SDXL-style UNet needs pooled text and size "
                         "conditioning); only SD 1.x / 2.x pipelines are supported")
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ValueError(f"model={str(path)!r}: unet/ cross_attention_dim {unet.config.cross_attention_dim} does not "
                         f"match text_encoder/ hidden_size {text_encoder.config.hidden_size}")
    text_encoder = text_encoder.to(dtype)
    return Pipeline(*(m.requires_grad_(False).eval() for m in (unet, vae, text_encoder)), tokenizer, scheduler_config)


# ---- random weights ----------------------------------------------------------------------------------------------
def fill_random(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Seeded random weights, fast: matrices and kernels normal with std 1/sqrt(fan_in), unit norm scales, zero
    biases. (The layers' own initialisers take most of a minute for SD's 1.4e9 parameters on a 2-core CPU and mean
    no more here.)"""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:   # e.g. CLIP's class embedding
                p.normal_(0.0, 0.02, generator=generator)
    return module


def random_module(build: Callable[[], nn.Module], generator: torch.Generator, dtype: torch.dtype) -> nn.Module:
    """`build()` with `fill_random` weights in `dtype`, frozen, in eval mode, skipping the layers' own slow
    initialisation."""
    from accelerate import init_empty_weights
    with init_empty_weights(include_buffers=False):   # no slow default initialisation; buffers stay real
        module = build()
    materialise(module, dtype)
    return fill_random(module, generator).requires_grad_(False).eval()


def materialise(module: nn.Module, dtype: torch.dtype) -> None:
    """Give every meta parameter real (uninitialised) CPU storage of `dtype`, leaving real buffers untouched."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(sub, name, nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=False))


def random_pipeline(dtype: torch.dtype, seed: int = RANDOM_WEIGHTS_SEED, unet_config: dict = SD15_UNET_CONFIG,
                    vae_config: dict = SD_VAE_CONFIG, text_config: dict = CLIP_L14_TEXT_CONFIG) -> Pipeline:
    """SD-1.5's architecture with random weights (UNet 860M, VAE 84M, CLIP ViT-L/14 text 123M parameters) and the
    byte-level tokenizer; nothing is downloaded. Other layouts (e.g. bench/sqdf_step.py's narrower ones) through
    the three configs."""
    generator = torch.Generator().manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    text_config = CLIPTextConfig(**text_config, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    unet = random_module(lambda: UNet2DConditionModel(**unet_config), generator, dtype)
    vae = random_module(lambda: AutoencoderKL(**vae_config), generator, dtype)
    text_encoder = random_module(lambda: CLIPTextModel(text_config), generator, dtype)
    return Pipeline(unet, vae, text_encoder, tokenizer, dict(SD_SCHEDULER_CONFIG))
