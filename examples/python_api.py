"""The Python API in one script (docs/api.md): build a config, train, resume, read the results, sample from the run,
and export its LoRA where the task has a diffusers format (Stable Diffusion). The same calls work in a notebook.

    python examples/python_api.py                                  # digits, tiny settings: about 20 s on a CPU
    python examples/python_api.py --steps 40 --out runs/api        # longer; --log-to tensorboard for the curves

Every call raises (ValueError, RuntimeError) instead of exiting: a bad option names itself, a resume that changes an
option other than those of `sqdf_fast.config.RESUMABLE` is refused.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from sqdf_fast import export_run, load_results, make_config, resume, run, sample_run

# tiny digits settings: seconds on a CPU, enough to move the model
TINY = dict(batch_size=8, rollout_batch=8, buffer_size=16, sample_steps=5, eval_per_class=4, lr=5e-3,
            log_every=2, checkpoint_every=4)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of the first run (resumed to twice)")
    parser.add_argument("--out", metavar="DIR", help="run directory (default: a temporary folder)")
    parser.add_argument("--log-to", default="none", help="experiment trackers: tensorboard, wandb, none")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sqdf-api-")) / "run"

    # 1. a config: options by name over the task's defaults, checked now (ValueError names a bad one)
    cfg = make_config(task="digits", steps=args.steps, out=str(out), progress=False, log_to=args.log_to, **TINY)

    # 2. train: the summary is what summary.json holds
    first = run(cfg)

    # 3. resume from the checkpoint, training longer (steps is one of the options a resume may change)
    summary = resume(out, steps=2 * args.steps)

    # 4. read the run back: config, summary, metrics rows and curves
    results = load_results(out)
    rewards = results.curve("reward")            # (step, mean reward of the trained samples) per log row
    evaluations = results.curve("eval_reward")   # (step, reward of the fixed-seed evaluation samples)
    print(f"reward {summary['reward_base']:.3f} (base) -> {first['reward_final']:.3f} after {first['steps']} steps "
          f"-> {summary['reward_final']:.3f} after {summary['steps']} | logged {len(rewards)} rows, evaluations at "
          f"steps {[step for step, _ in evaluations]}")

    # 5. samples of the fine-tuned model (defaults: the run's own evaluation seeds), and of the base model
    images, cond = sample_run(out, per_class=2, out=out / "more_samples.png")
    base_images, _ = sample_run(out, per_class=2, base=True)
    print(f"sampled {images.shape[0]} images of shape {tuple(images.shape[1:])} for conditions "
          f"{sorted(set(cond.tolist()))}; wrote {out / 'more_samples.png'}")

    # 6. export the LoRA in diffusers' format (Stable Diffusion tasks; digits keeps its adapter in checkpoint/)
    lora = export_run(out) if results.config.task in ("sd", "sd-random") else None
    print(f"LoRA: {lora or out / 'checkpoint' / 'adapter.safetensors'}")
    return {"first": first, "summary": summary, "results": results, "images": images, "base_images": base_images,
            "lora": lora}


if __name__ == "__main__":
    main()
