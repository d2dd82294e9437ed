"""What the soft-Q estimate (--q-samples n, --q-steps m; docs/method.md §3.6) costs per SQDF micro-step.

    OMP_NUM_THREADS=1 python bench/soft_q_cost.py [--configs 1:0 4:1 4:2 16:4] [--batch 32] [--repeats 5]

1. Measured, on the digits task on this machine: the median wall time of one micro-step (SQDF.loss + backward, the
   policy LoRA perturbed so that every gradient is non-zero, states at transitions spread over the chain) and the
   bytes autograd saves for its backward pass (sqdf_fast.memory.saved_tensor_bytes, frozen weights excluded), with
   the estimator checkpointed (the trainer's default elsewhere) and not (digits' default), for each n:m.
2. Counted, at SD-1.5 scale: FLOPs per trained sample from bench/sqdf_step.py's FLOP model (its pass_flops on the meta
   device: SD-1.5's UNet, VAE decoder and the CLIP reward tower at --resolution, guidance 5 as the SD task's default),
   with the consistency model (LCM-LoRA) run n (m + 1) times and the decoder and reward n times, each checkpointed
   (recomputed in the backward pass), against today's one of each.
Writes bench/results/soft_q_cost/cost.json (or --json PATH).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from sqdf_fast import config
from sqdf_fast.adapters import add_policy_lora
from sqdf_fast.info import device_name
from sqdf_fast.memory import saved_tensor_bytes
from sqdf_fast.methods.sqdf import SQDF
from sqdf_fast.schedule import DDIMSchedule
from sqdf_fast.tasks import digits

RESULTS = Path(__file__).resolve().parent / "results" / "soft_q_cost" / "cost.json"
MIB = 2**20


def micro_step(n: int, m: int, checkpointed: bool, batch: int, repeats: int) -> dict:
    cfg = config.TrainConfig(q_samples=n, q_steps=m, checkpoint_estimator=checkpointed, batch_size=batch)
    config.validate(cfg)
    task = digits.make_task(cfg)
    schedule = DDIMSchedule.build(task.scheduler_config, cfg.sample_steps)
    params = add_policy_lora(task.unet, task.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    method = SQDF(task, schedule, cfg)
    x = torch.randn((batch, *task.sample_shape), generator=generator)
    j = torch.arange(batch) % (cfg.sample_steps - 1)   # no row after the last transition: every row pays
    cond = task.sample_conditions(batch, generator)
    frozen = [p for module in (task.unet, *task.frozen) for p in module.parameters()]
    loss, saved = saved_tensor_bytes(lambda: method.loss(x, j, cond, None, generator)[0], exclude=frozen)
    loss.backward()
    times = []
    for _ in range(repeats):
        for p in params:
            p.grad = None
        start = time.perf_counter()
        method.loss(x, j, cond, None, generator)[0].backward()
        times.append(time.perf_counter() - start)
    return {"n": n, "m": m, "checkpoint_estimator": checkpointed, "batch": batch,
            "step_s_median": statistics.median(times), "step_s": times, "saved_mib": saved / MIB}


def sd_flops(configs: list[tuple[int, int]], resolution: int, guidance: float) -> dict:
    """Per trained sample, SD-1.5 at `resolution`: today's stages and, per n:m, the soft-Q's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import sqdf_step
    passes = sqdf_step.pass_flops("sd15", resolution)
    today = sqdf_step.model_flops(passes, guidance)["ours"]
    rows = []
    for n, m in configs:
        stages = dict(today, consistency=n * (m + 1) * today["consistency"], decode=n * today["decode"],
                      reward=n * today["reward"])
        total = sum(stages.values())
        rows.append({"n": n, "m": m, "tflops": {k: v / 1e12 for k, v in stages.items()}, "tflops_total": total / 1e12,
                     "vs_today": total / sum(today.values())})
    return {"arch": "sd15", "resolution": resolution, "guidance": guidance, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["1:0", "4:1", "4:2", "16:2", "16:4"], help="n:m pairs")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--no-measure", action="store_true", help="only the SD FLOP model")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs]
    env = [f"{key}={os.environ[key]}" for key in ("OMP_NUM_THREADS",) if key in os.environ]
    command = " ".join([*env, "python bench/soft_q_cost.py", *(sys.argv[1:] if argv is None else argv)])
    measured = [] if args.no_measure else [micro_step(n, m, flag, args.batch, args.repeats)
                                           for n, m in configs for flag in (False, True)]
    flops = sd_flops(configs, args.resolution, args.guidance)
    result = {"bench": "soft_q_cost", "command": command, "digits_micro_step": measured, "sd15_flops": flops,
              "torch": torch.__version__, "device": device_name(torch.device("cpu")),
              "threads": torch.get_num_threads(), "loadavg_1m": os.getloadavg()[0],
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    if measured:
        print(f"digits, micro-batch {args.batch}, median of {args.repeats}: step s and MiB saved for backward")
        print(f"{'n':>3s}{'m':>3s} | {'step s':>8s}{'saved':>9s} | {'step s ckpt':>12s}{'saved':>9s}")
        for n, m in configs:
            plain, ckpt = (next(r for r in measured if (r["n"], r["m"], r["checkpoint_estimator"]) == (n, m, f))
                           for f in (False, True))
            print(f"{n:3d}{m:3d} | {plain['step_s_median']:8.3f}{plain['saved_mib']:9.1f} | "
                  f"{ckpt['step_s_median']:12.3f}{ckpt['saved_mib']:9.1f}")
    print(f"SD-1.5 at {args.resolution} px, guidance {args.guidance:g}: TFLOP per trained sample (FLOP model)")
    for row in flops["rows"]:
        print(f"n {row['n']:2d} m {row['m']} | {row['tflops_total']:7.1f} TFLOP | x{row['vs_today']:.2f} | " +
              " ".join(f"{k} {v:.2f}" for k, v in row["tflops"].items()))
    print(f"written to {args.json}")
    return result


if __name__ == "__main__":
    main()
