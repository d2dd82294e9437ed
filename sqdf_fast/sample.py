"""Samples of a fine-tuned model: `sample_run` for any run, `python -m sqdf_fast.sample` for an SD pipeline's LoRA.

    images, cond = sample_run(RUN_DIR, per_class=8, out="grid.png")   # any task: the run's own sampler, in Python

`python -m sqdf_fast.sample`: an image grid from a local Stable-Diffusion-style pipeline, with or without a LoRA.

    python -m sqdf_fast.sample --model PATH [--lora RUN_DIR/lora] [--prompts FILE|LIST|"a cat;a dog"] \\
        [--per-prompt 4] [--steps 50] [--guidance 5] [--eta 1] [--seed 0] [--out grid.png]

It runs diffusers' own StableDiffusionPipeline with a DDIM scheduler (the trainer's sampler) and
`pipeline.load_lora_weights(--lora)`, so the grid is what any diffusers user of the exported LoRA gets. One row per
prompt; each prompt's images use seeds seed, seed + 1, ...
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch
from torch import Tensor

from sqdf_fast import cli
from sqdf_fast.distributed import resolve_device
from sqdf_fast.plots import save_grid


@torch.no_grad()
def sample_run(run_dir: str | Path, per_class: int | None = None, seed: int | None = None, device: str = "cpu",
               base: bool = False, out: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """Samples of a run's fine-tuned model (its checkpoint's adapter) on the run's task with the run's sampler
    (DDIM, sample_steps, eta, guidance): `per_class` samples of each evaluation condition (default: the run's
    eval_per_class), decoded, and their conditions. `seed` (default: the run's evaluation seed, so that the defaults
    give the run's final evaluation samples); `base`: the base model (adapter off) instead; `out`: also a PNG grid
    there (the run's samples_final.png layout: one row per condition). Works for any task, SD's too (for a diffusers
    pipeline with the exported LoRA, see `load_pipeline` and `sample_grid`)."""
    from sqdf_fast import checkpoint, config, tasks
    from sqdf_fast.adapters import add_policy_lora, load_adapter_state_dict
    from sqdf_fast.methods import Method
    from sqdf_fast.rollout import rollout
    from sqdf_fast.schedule import DDIMSchedule
    from sqdf_fast.train import EVAL_SEED_OFFSET, save_samples

    run_dir = Path(run_dir)
    cfg = config.from_dict(config.read_saved(run_dir), str(run_dir / "config.json"))
    per_class = cfg.eval_per_class if per_class is None else per_class
    if per_class < 1:
        raise ValueError(f"per_class={per_class}: must be >= 1")
    device = resolve_device(device)
    task = tasks.resolve(cfg.task)(cfg).to(device)
    add_policy_lora(task.unet, task.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    try:
        adapter, _ = checkpoint.load(run_dir, device)
    except ValueError as err:   # checkpoint.load speaks of resuming
        raise ValueError(str(err).replace("resume=", "run_dir=", 1)) from err
    load_adapter_state_dict(task.unet, adapter)
    schedule = DDIMSchedule.build(task.scheduler_config, cfg.sample_steps, device)
    method = Method(task, schedule, cfg)
    generator = torch.Generator(device).manual_seed(cfg.seed + EVAL_SEED_OFFSET if seed is None else seed)
    cond = task.eval_conditions(per_class).to(device)
    x_T = torch.randn((cond.shape[0], *task.sample_shape), generator=generator, device=device)
    _, x0, _ = rollout(method.reference_eps if base else method.policy_eps, schedule, x_T, cond, cfg.eta, generator)
    images = task.decode(x0)
    if out is not None:
        save_samples(task, images, dataclasses.replace(cfg, eval_per_class=per_class), Path(out))
    return images, cond


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
    parser = argparse.ArgumentParser(prog="python -m sqdf_fast.sample", description=__doc__.split("\n\n")[2],
                                     epilog=cli.EPILOG)
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="local diffusers Stable-Diffusion-style pipeline folder")
    parser.add_argument("--lora", metavar="PATH", help="an exported LoRA: a run's lora/ folder or its .safetensors "
                                                       "file, loaded with load_lora_weights")
    parser.add_argument("--prompts", default="simple-animals", metavar="FILE|NAME|LIST",
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
    parser.add_argument("--out", type=Path, default=Path("samples.png"), metavar="FILE",
                        help="output PNG (default samples.png)")
    args = parser.parse_args(argv)
    check_args(parser, args)
    with cli.usage_errors():
        if ";" in args.prompts:
            prompts = [p.strip() for p in args.prompts.split(";") if p.strip()]
        else:
            prompts = load_prompts(args.prompts)[1]   # the evaluation prompts of the list
        if not prompts:
            raise ValueError(f"prompts={args.prompts!r}: no prompt in it")
        prompts = prompts[:args.max_prompts]
    with cli.run_errors():
        pipeline = load_pipeline(args.model, resolve_device(args.device))
        if args.lora is not None:
            pipeline.load_lora_weights(args.lora)
    images = sample_grid(pipeline, prompts, args.per_prompt, args.steps, args.guidance, args.eta, args.seed,
                         args.resolution)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images * 2 - 1, args.out, nrow=args.per_prompt, scale=1)
    print(f"wrote {args.out}: {len(prompts)} prompts x {args.per_prompt} images")


if __name__ == "__main__":
    main()
