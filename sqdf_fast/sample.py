"""`python -m sqdf_fast.sample`: an image grid from a local Stable-Diffusion-style pipeline, with or without a LoRA.

    python -m sqdf_fast.sample --model PATH [--lora RUN_DIR/lora] [--prompts FILE|LIST|"a cat;a dog"] \\
        [--per-prompt 4] [--steps 50] [--guidance 5] [--eta 1] [--seed 0] [--out grid.png]

It runs diffusers' own StableDiffusionPipeline with a DDIM scheduler (the trainer's sampler) and
`pipeline.load_lora_weights(--lora)`, so the grid is what any diffusers user of the exported LoRA gets. One row per
prompt; each prompt's images use seeds seed, seed + 1, ...
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from sqdf_fast.distributed import resolve_device
from sqdf_fast.plots import save_grid


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """The pipeline in `model` (a diffusers SD folder, read with no network) with a DDIM scheduler and no safety
    checker. Built from its components, so a folder without model_index.json works too."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from sqdf_fast.tasks.sd import load_pipeline as load_parts
    parts = load_parts(model, dtype)
    pipeline = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                       unet=parts.unet, scheduler=DDIMScheduler.from_config(parts.scheduler_config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


@torch.no_grad()
def sample_grid(pipeline, prompts: list[str], per_prompt: int, steps: int, guidance: float, eta: float, seed: int,
                resolution: int | None = None) -> torch.Tensor:
    """(len(prompts) * per_prompt, 3, H, W) images in [0, 1], prompt-major."""
    device = pipeline.unet.device
    images = []
    for prompt in prompts:
        generators = [torch.Generator(device).manual_seed(seed + i) for i in range(per_prompt)]
        out = pipeline([prompt] * per_prompt, num_inference_steps=steps, guidance_scale=guidance, eta=eta,
                       generator=generators, height=resolution, width=resolution, output_type="pt")
        images.append(out.images.float().cpu())
    return torch.cat(images)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every impossible argument, with one usage error naming it, before anything is loaded."""
    from sqdf_fast.export import LORA_FILE
    for name in ("per_prompt", "max_prompts", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        parser.error(f"--guidance {args.guidance}: must be a finite number >= 0")
    if not 0 <= args.eta <= 1:
        parser.error(f"--eta {args.eta}: must lie in [0, 1]")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        parser.error(f"--resolution {args.resolution}: must be a positive multiple of 8 (the VAE downsamples by 8)")
    if not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: no such folder")
    if args.lora is not None:
        lora = Path(args.lora)
        if not (lora.is_file() and lora.suffix == ".safetensors" or (lora / LORA_FILE).is_file()):
            parser.error(f"--lora {args.lora}: not a LoRA (a .safetensors file, or a folder holding {LORA_FILE}, "
                         "as export writes)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        parser.error(f"--device {args.device}: must be auto, cpu, cuda or cuda:N")


def main(argv: list[str] | None = None) -> None:
    from sqdf_fast.tasks.sd import load_prompts
    parser = argparse.ArgumentParser(prog="python -m sqdf_fast.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local diffusers Stable-Diffusion-style pipeline folder")
    parser.add_argument("--lora", help="folder of an exported LoRA (a run's lora/), loaded with load_lora_weights")
    parser.add_argument("--prompts", default="simple-animals",
                        help="prompt file (one per line), a built-in list name (default simple-animals: its held-out "
                             "evaluation prompts), or prompts separated by ';'")
    parser.add_argument("--per-prompt", type=int, default=4, help="images per prompt: one grid row (default 4)")
    parser.add_argument("--max-prompts", type=int, default=8, help="first N prompts of the list (default 8)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance (default 5)")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta (default 1, as in training)")
    parser.add_argument("--resolution", type=int, help="image size in pixels (default: the UNet's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("samples.png"), help="output PNG (default samples.png)")
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        if ";" in args.prompts:
            prompts = [p.strip() for p in args.prompts.split(";") if p.strip()]
        else:
            prompts = load_prompts(args.prompts)[1]   # the evaluation prompts of the list
        if not prompts:
            raise ValueError(f"prompts={args.prompts!r}: no prompt in it")
        prompts = prompts[:args.max_prompts]
        pipeline = load_pipeline(args.model, resolve_device(args.device))
        if args.lora is not None:
            pipeline.load_lora_weights(args.lora)
    except ValueError as err:
        sys.exit(f"error: {err}")
    images = sample_grid(pipeline, prompts, args.per_prompt, args.steps, args.guidance, args.eta, args.seed,
                         args.resolution)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images * 2 - 1, args.out, nrow=args.per_prompt, scale=1)
    print(f"wrote {args.out}: {len(prompts)} prompts x {args.per_prompt} images")


if __name__ == "__main__":
    main()
