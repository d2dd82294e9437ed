"""Tiny Stable-Diffusion-style pipelines for tests, built from configs and saved locally (nothing is downloaded).

Every SD test reuses these; import them from tests (tests/ is on sys.path under pytest):

    from sd_fixtures import TINY_RESOLUTION, make_tiny_pipeline, make_tiny_lcm_lora, tiny_sd_config

- `make_tiny_pipeline(folder)` writes the standard diffusers layout that `--task sd --model folder` loads:
      unet/          UNet2DConditionModel, 2 levels (32, 64 channels), one cross-attention level, cross-attention
                     width 32, 8x8 latents
      vae/           AutoencoderKL with 4 levels (8 image pixels per latent pixel, as SD's), 3 -> 4 latent channels
      text_encoder/  CLIPTextModel, 2 layers, width 32, 32 positions, bos/eos ids of the tokenizer
      tokenizer/     CLIP BPE vocab.json + merges.txt: the 256 byte symbols, no merges (sqdf_fast.tasks.sd)
      scheduler/     scheduler_config.json: SD's DDIM config (scaled-linear betas 0.00085..0.012, leading spacing)
  Images are TINY_RESOLUTION = 64 pixels square.
- `make_tiny_lcm_lora(path, pipeline_folder)` writes a random LoRA for that UNet's attention and resnet convolutions
  in diffusers' key format (`unet.<module>.lora_A.weight` / `lora_B.weight`), the file a
  `StableDiffusionPipeline.load_lora_weights` call accepts, standing in for an LCM-LoRA; with `kohya_alpha` in
  kohya's keys (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`), the published LCM-LoRA's format.
- `tiny_sd_config(folder, out, **overrides)` is a validated TrainConfig for `--task sd` on such a folder with tiny
  sampling, batch and evaluation sizes.
The networks come from `sqdf_fast.tasks.sd_tiny` (also used by bench/rollout.py --tiny).
Building both takes about a second; use a module- or session-scoped fixture around them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from sqdf_fast import config
from sqdf_fast.tasks.sd import SD_SCHEDULER_CONFIG, byte_level_vocab, random_lora_state_dict
from sqdf_fast.tasks.sd_tiny import (  # noqa: F401 (re-exported for the tests)
    TINY_LATENT,
    TINY_RESOLUTION,
    TINY_TEXT_CONFIG,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
    tiny_networks,
)

TINY_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]   # attention and resnet convs


def write_tokenizer(folder: Path) -> None:
    """vocab.json + merges.txt of the byte-level CLIP BPE vocabulary (the files SD's tokenizer/ folder holds)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(byte_level_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # the context length, as SD's tokenizer_config.json gives it (77 there): diffusers' pipeline pads prompts to it
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length":
                                                              TINY_TEXT_CONFIG["max_position_embeddings"]}))


def make_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """A tiny SD pipeline folder (layout in the module docstring), random weights from `seed`."""
    folder = Path(folder)
    unet, vae, text_encoder = tiny_networks(seed)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    write_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    scheduler = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, **SD_SCHEDULER_CONFIG}   # as SD ships it
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return folder


def tiny_lcm_lora_state_dict(pipeline_folder: str | Path, seed: int = 1, rank: int = 4) -> dict[str, torch.Tensor]:
    unet = UNet2DConditionModel.from_pretrained(Path(pipeline_folder) / "unet", local_files_only=True)
    return random_lora_state_dict(unet, TINY_LORA_TARGETS, rank, torch.Generator().manual_seed(seed), scale=0.3)


def kohya_keys(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The same LoRA in kohya's keys, as the published LCM-LoRA files are written: `lora_unet_<module with _>`
    `.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha` (the update is scaled by alpha / rank)."""
    kohya = {}
    for key, value in state.items():
        module, _, kind = key.removeprefix("unet.").rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_down.weight" if kind == "A.weight" else f"{name}.lora_up.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(float(alpha))
    return kohya


def make_tiny_lcm_lora(path: str | Path, pipeline_folder: str | Path, seed: int = 1,
                       kohya_alpha: float | None = None) -> Path:
    """A random LoRA safetensors file for the tiny UNet of `pipeline_folder`, in diffusers' keys (or kohya's with
    that alpha); its effect on the UNet's output is of the order of the output itself, so tests can tell it apart."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = tiny_lcm_lora_state_dict(pipeline_folder, seed)
    save_file(state if kohya_alpha is None else kohya_keys(state, kohya_alpha), str(path))
    return path


def tiny_sd_config(model: str | Path, out: str | Path, **overrides) -> config.TrainConfig:
    """A validated TrainConfig for `--task sd` on a tiny pipeline: 3 DDIM steps, 64 px, batches of 2, guidance 2."""
    values = dataclasses.asdict(config.from_dict({"task": "sd"}, "tiny_sd_config"))
    values.update(model=str(model), out=str(out), resolution=TINY_RESOLUTION, sample_steps=3, guidance=2.0,
                  steps=2, batch_size=2, rollout_batch=2, buffer_size=4, buffer_dtype="float32",
                  eval_per_class=2, log_every=1, checkpoint_every=2, progress=False, device="cpu",
                  prompts="simple-animals")
    values.update(overrides)
    cfg = config.TrainConfig(**values)
    config.validate(cfg)
    return cfg
