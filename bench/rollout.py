"""Guided DDIM rollout throughput: our sampler against the loop a diffusers user writes, and its torch.compile.

    python bench/rollout.py [--tiny] [--device auto|cpu|cuda] [--batch-sizes 1,8,32] [--steps 50] [--guidance 7.5]
                            [--eta 1.0] [--repeat 3] [--warmup 1] [--no-compile] [--attention sdpa|xformers]
                            [--results] [--json PATH]

Task: `sd-random` (SD-1.5 UNet, random weights, 512 px = 64x64 latents, bfloat16 weights on CUDA) by default;
`--tiny`: the tests' tiny SD pipeline (sqdf_fast.tasks.sd_tiny, 8x8 latents), which runs end to end on a CPU.
Every implementation runs the same UNet with the same policy LoRA attached (rank 4 on attention, as training does),
the same prompts, x_T and generator seed, from x_T to the final latent (no VAE decode: "images" are latents):

    ours      sqdf_fast: guided epsilon on the doubled [uncond; cond] batch, the fused guidance + DDIM step
              (`ops.rollout_step`, Triton on CUDA), the whole T-step loop captured as one CUDA graph per batch size
              (sqdf_fast.graphs.GraphRollout; on the CPU it is the eager loop with the fused step)
    eager     the diffusers-style loop a user writes: UNet on torch.cat([x, x]) with [uncond; cond] embeddings,
              torch ops for guidance, diffusers `DDIMScheduler.step(eps, t, x, eta, generator)`
    compile   the same loop with the UNet call torch.compile(mode="reduce-overhead") (the scheduler step stays eager:
              it indexes host tables); compilation and graph recording happen in the warm-up (--no-compile skips)

Each is timed twice: `initial`, and `after-lora`, after perturbing the policy LoRA in place (what an optimizer step
does), to show the captured graphs / compiled code stay valid without re-capture (`recaptures`, and the output still
matching eager). Timing: median and min of --repeat calls after --warmup calls (CUDA synchronised around each);
`first_call_s` is the first call (capture or compilation included). `max_abs_diff` is the final latent's largest
difference from eager's (the noise streams are identical: both draw one randn per step from the same generator).

`--attention xformers` runs every implementation's UNet with xformers' memory-efficient attention instead of torch's
SDPA (optional, CUDA only: a clear error without it; `attention` in the rows).

Prints a table; rows (device name, versions, timestamp, run_id) are appended to bench/results/rollout.jsonl only with
--results, and written as a JSON list to --json PATH when given.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from diffusers import DDIMScheduler  # noqa: E402

from sqdf_fast import config, ops  # noqa: E402
from sqdf_fast.adapters import POLICY, add_policy_lora  # noqa: E402
from sqdf_fast.graphs import GraphRollout  # noqa: E402
from sqdf_fast.info import device_name, version  # noqa: E402
from sqdf_fast.methods import Method  # noqa: E402
from sqdf_fast.schedule import DDIMSchedule  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "rollout.jsonl"
IMPLS = ("ours", "eager", "compile")


def set_attention(unets: list[torch.nn.Module], backend: str, device: torch.device) -> None:
    """sdpa: torch's scaled_dot_product_attention (diffusers' default); xformers: its memory-efficient attention,
    optional and CUDA-only (bench/sqdf_step.py takes the same option)."""
    if backend == "sdpa":
        return
    try:
        import xformers  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"--attention xformers: xformers is not importable ({err}); install it or use sdpa")
    if device.type != "cuda":
        raise SystemExit(f"--attention xformers: xformers' attention runs on CUDA only, the device is {device}")
    for unet in unets:
        unet.enable_xformers_memory_efficient_attention()


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny SD pipeline instead of sd-random")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer (slow to compile on CPU)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "xformers"),
                   help="attention of the UNet: torch SDPA, or xformers' memory-efficient attention (CUDA only)")
    p.add_argument("--results", action="store_true", help=f"append the rows to {RESULTS.relative_to(ROOT)}")
    p.add_argument("--json", default=None, help="also write the rows as a JSON list here")
    return p.parse_args(argv)


def build(tiny: bool, device: torch.device, steps: int, guidance: float, eta: float) -> Method:
    """The task (policy LoRA attached, on the device) and its DDIM schedule, as the trainer builds them."""
    from sqdf_fast.tasks import sd
    on_cuda = device.type == "cuda"
    values = dict(task="sd", sample_steps=steps, guidance=guidance, eta=eta, device=str(device),
                  weights_dtype="bfloat16" if on_cuda else "float32")
    if tiny:
        from sqdf_fast.tasks.sd_tiny import TINY_RESOLUTION, tiny_task
        cfg = config.TrainConfig(**values, resolution=TINY_RESOLUTION)
        task = tiny_task(cfg, dtype=sd.weights_dtype(cfg))
    else:
        cfg = config.TrainConfig(**values, resolution=512)
        task = sd.build_task("sd-random", cfg, sd.random_pipeline(sd.weights_dtype(cfg)))
    add_policy_lora(task.unet, task.lora_targets, cfg.lora_rank, cfg.lora_alpha, seed=0)
    perturb_lora(task.unet, seed=1, scale=0.05)   # B = 0 at initialisation: give the policy an effect
    task.to(device)
    return Method(task, DDIMSchedule.build(task.scheduler_config, steps, device), cfg)


@torch.no_grad()
def perturb_lora(unet: torch.nn.Module, seed: int, scale: float) -> None:
    """An optimizer-like in-place update of the policy LoRA (storages unchanged)."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if f".{POLICY}." in name:
            p.add_(torch.randn(p.shape, generator=generator).to(p.device, p.dtype) * scale)


def diffusers_loop(method: Method, denoise):
    """The sampling loop as a diffusers user writes it; `denoise(latent_in, t, context) -> eps` is the UNet call."""
    task, cfg = method.task, method.cfg
    scheduler = DDIMScheduler.from_config(task.scheduler_config)
    device = method.schedule.timesteps.device
    scheduler.set_timesteps(cfg.sample_steps, device=device)
    table = task.frozen[0]   # the task's PromptTable: prompt embeddings, as the pipeline's encode_prompt returns

    @torch.no_grad()
    def sample(x_T, cond, generator):
        context = torch.cat([table(task.null_condition(cond)), table(cond)])
        x = x_T
        for t in scheduler.timesteps:
            latent_in = torch.cat([x, x])
            eps = denoise(latent_in.to(context.dtype), t, context).to(x.dtype)
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + cfg.guidance * (eps_cond - eps_uncond)
            x = scheduler.step(eps, t, x, eta=cfg.eta, generator=generator).prev_sample
        return x
    return sample


def samplers(method: Method, impls: list[str]) -> dict:
    unet = method.task.unet

    def unet_call(latent_in, t, context):
        return unet(latent_in, t, encoder_hidden_states=context).sample

    out = {}
    if "ours" in impls:
        graph = GraphRollout(method.policy_eps, method.schedule, method.cfg.eta, modules=[unet])
        out["ours"] = (lambda x_T, cond, g: graph(x_T, cond, g)[1], graph)
    if "eager" in impls:
        out["eager"] = (diffusers_loop(method, unet_call), None)
    if "compile" in impls:
        out["compile"] = (diffusers_loop(method, torch.compile(unet_call, mode="reduce-overhead")), None)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, args_fn, device: torch.device, warmup: int, repeat: int) -> tuple[float, list[float], torch.Tensor]:
    """(first call s, timed call s, the first call's output)."""
    times, first, output = [], None, None
    for i in range(1 + max(warmup - 1, 0) + repeat):
        args = args_fn()
        sync(device)
        start = time.perf_counter()
        result = fn(*args)
        sync(device)
        elapsed = time.perf_counter() - start
        if i == 0:
            first, output = elapsed, result.float().clone()
        elif i >= max(warmup, 1):
            times.append(elapsed)
    return first, times, output


def versions() -> dict:
    return {"torch": torch.__version__, "triton": version("triton"), "diffusers": version("diffusers"),
            "peft": version("peft"), "cuda": torch.version.cuda}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    impls = [i for i in args.impls.split(",") if i and not (i == "compile" and args.no_compile)]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.attention == "xformers":
        set_attention([], "xformers", device)   # the clear error before anything is built
    method = build(args.tiny, device, args.steps, args.guidance, args.eta)
    set_attention([method.task.unet], args.attention, device)
    task_name = "sd-tiny" if args.tiny else "sd-random"
    backend, _ = ops.backend_for(device)
    run_id, stamp = uuid.uuid4().hex[:12], time.strftime("%Y-%m-%dT%H:%M:%S%z")
    common = dict(bench="rollout", task=task_name, steps=args.steps, guidance=args.guidance, eta=args.eta,
                  attention=args.attention,
                  latent_shape=list(method.task.sample_shape), weights_dtype=str(method.cfg.weights_dtype),
                  device=device.type, device_name=device_name(device), op_backend=backend, **versions(),
                  timestamp=stamp, run_id=run_id, command="python bench/rollout.py " + shlex.join(sys.argv[1:]))
    fns = samplers(method, impls)
    rows = []
    for batch in batches:
        gen_device = device
        cond = method.task.sample_conditions(batch, torch.Generator(gen_device).manual_seed(batch))
        x_T = torch.randn((batch, *method.task.sample_shape), generator=torch.Generator(gen_device).manual_seed(batch),
                          device=device)

        def args_fn():
            return x_T, cond, torch.Generator(gen_device).manual_seed(1000 + batch)

        for phase in ("initial", "after-lora"):
            if phase == "after-lora":
                perturb_lora(method.task.unet, seed=100 + batch, scale=0.05)
            outputs = {}
            for impl, (fn, graph) in fns.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                first, times, outputs[impl] = time_calls(fn, args_fn, device, args.warmup, args.repeat)
                median = statistics.median(times)
                row = dict(common, impl=impl + ("-graph" if impl == "ours" and graph.uses_graph(x_T) else ""),
                           phase=phase, batch=batch, first_call_s=first, median_s=median, min_s=min(times),
                           repeat=len(times), images_per_s=batch / median,
                           peak_mb=(torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                                    else None),
                           recaptures=graph.recaptures if graph is not None else None,
                           captures=graph.captures if graph is not None else None)
                rows.append(row)
            if "eager" in outputs:
                for row in rows[-len(fns):]:
                    name = row["impl"].removesuffix("-graph")
                    row["max_abs_diff"] = float((outputs[name] - outputs["eager"]).abs().max())
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.results:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    r0 = rows[0]
    print(f"rollout: {r0['task']} latents {r0['latent_shape']}, {r0['steps']} steps, guidance {r0['guidance']}, "
          f"eta {r0['eta']}, weights {r0['weights_dtype']}, {r0['device_name']}, torch {r0['torch']}, ops "
          f"{r0['op_backend']}")
    eager = {(r["batch"], r["phase"]): r["median_s"] for r in rows if r["impl"] == "eager"}
    header = (f"{'batch':>5} {'phase':>10} {'impl':>12} {'median ms':>10} {'images/s':>9} {'vs eager':>8} "
              f"{'first s':>8} {'peak MB':>8} {'max|diff|':>9} {'recapt':>6}")
    print(header)
    for r in rows:
        base = eager.get((r["batch"], r["phase"]))
        speed = f"{base / r['median_s']:.2f}x" if base else "-"
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        diff = f"{r['max_abs_diff']:.1e}" if r.get("max_abs_diff") is not None else "-"
        recapt = "-" if r["recaptures"] is None else str(r["recaptures"])
        print(f"{r['batch']:>5} {r['phase']:>10} {r['impl']:>12} {r['median_s'] * 1e3:>10.1f} "
              f"{r['images_per_s']:>9.2f} {speed:>8} {r['first_call_s']:>8.2f} {peak:>8} {diff:>9} {recapt:>6}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
