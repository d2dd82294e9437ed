"""The fine-tuned policy LoRA in diffusers' format, so that the base pipeline reproduces the fine-tuned model:

    pipeline = StableDiffusionPipeline.from_pretrained(BASE)      # the --model folder the run fine-tuned
    pipeline.load_lora_weights(RUN_DIR / "lora")                  # pytorch_lora_weights.safetensors

The file holds the adapter's weights under diffusers' `unet.` keys and its LoRA config (rank, lora_alpha, target
modules) as safetensors metadata, which `load_lora_weights` reads back: an alpha other than the rank keeps its scale.

    python -m sqdf_fast.export RUN_DIR [--out DIR]    # from a run's checkpoint (default DIR: RUN_DIR/lora)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from sqdf_fast import cli
from sqdf_fast.adapters import POLICY, adapter_state_dict

LORA_FILE = "pytorch_lora_weights.safetensors"


def save_diffusers_lora(unet: nn.Module, directory: Path) -> Path:
    """Write the UNet's policy adapter to DIR/pytorch_lora_weights.safetensors in diffusers' format (float32)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    config = getattr(unet, "peft_config", {}).get(POLICY)
    if config is None:
        raise ValueError(f"{type(unet).__name__} has no {POLICY!r} adapter to export")
    weights = {k: v.float().cpu() for k, v in adapter_state_dict(unet).items()}
    metadata = config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])   # a set in peft; metadata is JSON
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=convert_state_dict_to_diffusers(weights),
                                              unet_lora_adapter_metadata=metadata, weight_name=LORA_FILE)
    return directory / LORA_FILE


def export_run(run_dir: Path, out: Path | None = None) -> Path:
    """The LoRA of a run's checkpoint (SD-style tasks), rebuilt on the run's task and written in diffusers' format."""
    from diffusers import UNet2DConditionModel

    from sqdf_fast import checkpoint, config, tasks
    from sqdf_fast.adapters import add_policy_lora, load_adapter_state_dict

    what = f"run_dir={str(run_dir)!r}"
    saved = Path(run_dir) / "config.json"
    if not saved.is_file():
        raise cli.UsageError(f"{what}: no config.json there (not a run directory)")
    cfg = config.from_dict(config.read_json(saved, what), str(saved))
    task = tasks.resolve(cfg.task)(cfg)
    if not isinstance(task.unet, UNet2DConditionModel):
        raise cli.UsageError(f"{what}: a run of task {cfg.task!r}, whose model is a {type(task.unet).__name__}; export "
                             "writes the LoRA of a Stable Diffusion UNet (UNet2DConditionModel) in diffusers' "
                             "format")
    add_policy_lora(task.unet, task.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    try:
        adapter, _ = checkpoint.load(Path(run_dir), torch.device("cpu"))
    except ValueError as err:   # checkpoint.load speaks of resuming
        raise ValueError(str(err).replace("resume=", "run_dir=", 1)) from err
    load_adapter_state_dict(task.unet, adapter)
    return save_diffusers_lora(task.unet, out if out is not None else Path(run_dir) / "lora")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sqdf_fast.export", description=__doc__.split("\n\n")[0],
                                     epilog=cli.EPILOG)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory with a checkpoint")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default RUN_DIR/lora)")
    args = parser.parse_args(argv)
    with cli.run_errors():
        path = export_run(args.run_dir, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
