"""Memory saved by gradient checkpointing in one SQDF micro-step on Stable Diffusion, measured device-independently.

    python bench/checkpoint_memory.py [--task sd-random] [--resolution 128] [--json PATH] [-- extra train options]

Builds the task once (default `sd-random`: SD-1.5's UNet, VAE and text encoder, a rank-64 LCM-LoRA adapter and a
CLIP ViT-L/14 reward, random weights, float32 on the CPU), adds the policy LoRA, then for each setting of the three
switches (checkpoint_estimator: the consistency model; checkpoint_decoder: the VAE decoder; checkpoint_reward: the
reward model) runs one SQDF micro-step loss at batch 1 on a trained step j < T - 1 (so the consistency model is on
the gradient path) and counts the bytes autograd saves for its backward pass (sqdf_fast.memory.saved_tensor_bytes:
distinct storages, parameters excluded since they are resident anyway). The backward pass then runs too, and its
adapter gradients are compared with those of the run without checkpointing. Prints a table and writes
bench/results/checkpoint_memory.json (or PATH) with the command, the rows, device and versions.

Saved-for-backward bytes are what checkpointing trades for recomputation; they do not depend on the device, so the
CPU measurement at a small resolution stands for the GPU (activations scale with the pixel count: about 16x at
512 px than at 128 px, for the UNet and the VAE; the reward always sees 224 px).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from sqdf_fast import config, ops
from sqdf_fast.adapters import add_policy_lora
from sqdf_fast.memory import parameter_bytes, saved_tensor_bytes
from sqdf_fast.methods.sqdf import SQDF
from sqdf_fast.schedule import DDIMSchedule
from sqdf_fast.tasks import build

RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint_memory.json"
# (estimator, decoder, reward): none, each alone, all three
SETTINGS = [(False, False, False), (True, False, False), (False, True, False), (False, False, True),
            (True, True, True)]
MIB = 2**20


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sd-random")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True,
                        help="also run each backward pass and compare the adapter gradients (the count itself needs "
                             "only the forward pass, so --no-backward is quicker)")
    parser.add_argument("train_args", nargs="*", help="extra config options as --name value (after --)")
    args = parser.parse_args(argv)
    command = " ".join(["python bench/checkpoint_memory.py", *(sys.argv[1:] if argv is None else argv)])

    extra = vars(config.build_parser().parse_args(args.train_args))
    values = {"task": args.task, "resolution": args.resolution, "device": "cpu", "weights_dtype": "float32",
              "batch_size": 1, **extra}
    cfg = config.from_dict(values, "checkpoint_memory")
    config.validate(cfg)
    torch.manual_seed(0)
    start = time.perf_counter()
    task = build(cfg, torch.device("cpu"))
    params = add_policy_lora(task.unet, task.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    build_s = time.perf_counter() - start
    schedule = DDIMSchedule.build(task.scheduler_config, cfg.sample_steps)
    resident = [p for module in (task.unet, *task.frozen) for p in module.parameters()]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((1, *task.sample_shape), generator=generator)
    cond = task.sample_conditions(1, generator)
    j = torch.tensor([schedule.num_steps // 2])   # mid-chain: the reward's gradient passes the consistency model
    print(f"{task.name} at {cfg.resolution} px (latents {tuple(task.sample_shape)}), built in {build_s:.0f} s; "
          f"parameters held {parameter_bytes([task.unet, *task.frozen]) / MIB:.0f} MiB", flush=True)

    rows, reference_grads = [], None
    for estimator, decoder, reward in SETTINGS:
        run_cfg = dataclasses.replace(cfg, checkpoint_estimator=estimator)
        task.decode.enabled, task.reward.enabled = decoder, reward
        method = SQDF(task, schedule, run_cfg)
        for p in params:
            p.grad = None
        start = time.perf_counter()
        loss, saved = saved_tensor_bytes(lambda: method.loss(x, j, cond, None, torch.Generator().manual_seed(2))[0],
                                         exclude=resident)
        loss_value = float(loss.detach())
        scale = diff = None
        if args.backward:
            loss.backward()
            grads = [p.grad.clone() for p in params]
            reference_grads = grads if reference_grads is None else reference_grads
            scale = max(float(g.abs().max()) for g in reference_grads)
            diff = max(float((g - r).abs().max()) for g, r in zip(grads, reference_grads))
        seconds = time.perf_counter() - start
        del loss   # frees this setting's saved tensors before the next one
        rows.append({"checkpoint_estimator": estimator, "checkpoint_decoder": decoder, "checkpoint_reward": reward,
                     "saved_bytes": saved, "saved_mib": round(saved / MIB, 1), "loss": loss_value,
                     "grad_max_abs_diff_vs_none": diff, "grad_max_abs": scale,
                     "seconds": round(seconds, 2)})
        check = f" | grad diff {diff:.2e} (max |grad| {scale:.2e})" if args.backward else ""
        print(f"  estimator {estimator!s:5s} decoder {decoder!s:5s} reward {reward!s:5s}: saved for backward "
              f"{saved / MIB:8.1f} MiB | {seconds:5.1f} s{check}", flush=True)

    none = rows[0]["saved_bytes"]
    result = {
        "bench": "checkpoint_memory", "command": command, "task": task.name, "resolution": cfg.resolution,
        "latent_shape": list(task.sample_shape), "batch": 1, "sample_steps": cfg.sample_steps,
        "guidance": cfg.guidance, "trained_step_j": int(j), "q_estimator": method.estimator_name,
        "weights_dtype": cfg.weights_dtype, "backward": args.backward,
        "parameter_bytes_held": parameter_bytes([task.unet, *task.frozen]),
        "rows": rows, "saving_all_three_vs_none": round(1 - rows[-1]["saved_bytes"] / none, 4),
        "build_s": round(build_s, 1), "device": f"cpu ({platform.processor() or platform.machine()})",
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "kernels": ops.backend_for("cpu")[0], "python": platform.python_version(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for package in ("diffusers", "transformers", "peft"):
        result[package] = __import__(package).__version__
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")

    print(f"\n{'checkpointed':28s}{'saved for backward (MiB)':>26s}{'vs none':>10s}{'time (s)':>10s}")
    for row in rows:
        names = [n for n, on in (("estimator", row["checkpoint_estimator"]), ("decoder", row["checkpoint_decoder"]),
                                 ("reward", row["checkpoint_reward"])) if on]
        label = " + ".join(names) or "none"
        print(f"{label:28s}{row['saved_mib']:26.1f}{row['saved_bytes'] / none:10.2f}{row['seconds']:10.1f}")
    print(f"written to {args.json}")
    return result


if __name__ == "__main__":
    main()
