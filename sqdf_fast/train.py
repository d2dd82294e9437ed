"""`python -m sqdf_fast.train`: fine-tune a diffusion model toward a reward with SQDF.

Reads top to bottom: config -> task -> policy adapter, optimizer, buffer -> (resume | base evaluation) ->
loop [rollout into the buffer, draw (trajectory, step) pairs, SQDF loss, guarded optimizer step, log, checkpoint]
-> final evaluation, plots, summary. Nothing inside a training step reads a tensor value on the host: metrics
stay on the device until a log line, and a non-finite loss is skipped on the device.

Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) every process runs this same loop data-parallel
(sqdf_fast.distributed): batch_size, rollout_batch and buffer_size are global and split evenly; each rank draws its
own noise and keeps its own buffer shard; the adapter gradients are averaged over the ranks before clipping and the
step; metrics are averaged or gathered; only rank 0 prints and writes the run directory and checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel
from torch import Tensor
from tqdm import tqdm

from sqdf_fast import checkpoint, config, ops, rewards, tasks
from sqdf_fast.adapters import (
    adapter_state_dict,
    add_policy_lora,
    load_adapter_state_dict,
)
from sqdf_fast.buffer import ReplayBuffer
from sqdf_fast.distributed import (
    Context,
    launch,
    resolve_device,
    tensors_digest,
    to_device,
)
from sqdf_fast.export import save_diffusers_lora
from sqdf_fast.graphs import method_rollout
from sqdf_fast.memory import Checkpointed
from sqdf_fast.method import SQDF, make_method, sample_steps
from sqdf_fast.metrics import per_class_diversity, per_class_fd
from sqdf_fast.plots import save_curves, save_grid
from sqdf_fast.rollout import rollout
from sqdf_fast.schedule import DDIMSchedule

EVAL_SEED_OFFSET = 99_991       # evaluation noise comes from its own generator: same seeds for base and final
SUMMARY_KEYS = ("reward_base", "reward_final", "diversity_base", "diversity_final", "fd_base", "fd_final",
                "kl_final", "steps", "wall_s")


def rank_seed(seed: int, rank: int | None = None) -> int:
    """Each data-parallel rank draws its own noise (rank: default the RANK the launcher set)."""
    return seed + 1_000_003 * (int(os.environ.get("RANK", "0")) if rank is None else rank)


def make_optimizer(params: list[Tensor], cfg: config.TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with its state created up front, so a skipped step can restore every state tensor."""
    capturable = device.type == "cuda"   # keeps the step count on the device: no sync in guarded_step
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, capturable=capturable)
    for p in params:
        optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=device if capturable else "cpu"),
                              "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    return optimizer


def guarded_step(optimizer: torch.optim.Optimizer, finite: Tensor) -> None:
    """optimizer.step(), undone on the device when `finite` is False (a NaN/Inf loss skips the whole step)."""
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]
    saved = [t.detach().clone() for t in tensors]
    optimizer.step()
    with torch.no_grad():
        for t, old in zip(tensors, saved):
            t.copy_(torch.where(finite, t, old))


@torch.no_grad()
def evaluate(method: SQDF, cfg: config.TrainConfig, ctx: Context, with_kl: bool,
             base_features: dict[int, Tensor] | None = None) -> tuple[dict, Tensor, dict[int, Tensor]]:
    """Reward, diversity, fd and path KL to the base (nats) of fixed-seed samples; the samples; their features by
    condition. fd is against the task's real data, or, for a task without any (real_features None), against
    `base_features`, the base model's own evaluation features (None: these samples' own, so the base's fd is 0):
    then fd measures the drift from the base model.

    With several ranks each samples a contiguous shard of the evaluation conditions, drawing that shard's rows of
    the same x_T and per-step noise a single process draws for the whole batch (same seeds on every rank), so the
    samples are the ones one process would make; images, rewards, features and KLs are gathered and every rank
    computes the same metrics."""
    task, device = method.task, ctx.device
    cond = task.eval_conditions(cfg.eval_per_class).to(device)
    generator = torch.Generator(device).manual_seed(cfg.seed + EVAL_SEED_OFFSET)
    x_T = torch.randn((cond.shape[0], *task.sample_shape), generator=generator, device=device)
    rows = ctx.shard(cond.shape[0])
    _, x0, path_kl = rollout(method.policy_eps, method.schedule, x_T[rows], cond[rows], cfg.eta, generator,
                             method.reference_eps if with_kl else None, batch_rows=(rows, cond.shape[0]))
    images = task.decode(x0)
    reward, features = task.reward(images, cond[rows]), task.features(images)
    images, reward, features = ctx.gather_rows(images), ctx.gather_rows(reward), ctx.gather_rows(features)
    by_class = {int(c): features[cond == c] for c in torch.unique(cond).tolist()}
    if task.real_features is not None:
        reference = task.real_features(cond)
    else:
        reference = base_features if base_features is not None else by_class
    metrics = {"reward": float(reward.mean()),
               "diversity": per_class_diversity(features, cond),
               "fd": per_class_fd(features, cond, reference),
               "kl": float(ctx.gather_rows(path_kl).mean()) if with_kl else 0.0}
    if task.target_metrics is not None:
        metrics.update(task.target_metrics(images, cond))
    return metrics, images, by_class


def collect(method: SQDF, n: int, cfg: config.TrainConfig, generator: torch.Generator) -> dict[str, Tensor]:
    """n fresh trajectories of the current policy (no grad) with their final rewards."""
    task = method.task
    cond = task.sample_conditions(n, generator)
    x_T = torch.randn((n, *task.sample_shape), generator=generator, device=generator.device)
    states, x0, _ = method_rollout(method, cfg)(x_T, cond, generator)   # eager unless cfg.cuda_graphs on CUDA
    with torch.no_grad():
        images = task.decode(x0)
        reward = task.reward(images, cond)
    return {"states": states, "cond": cond, "reward": reward, "images": images}


def draw(micro: int, size: int, fresh: dict | None, buffer: ReplayBuffer | None, cfg: config.TrainConfig,
         num_steps: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One micro-batch of `size` (x_j, j, cond, loss weight): from the buffer, or from this step's fresh
    trajectories (micro-batch `micro` takes its own rows of them)."""
    n_traj = size // cfg.steps_per_trajectory
    device = generator.device
    if buffer is not None and cfg.buffer_sampler == "reward-gamma":
        slots, j, weight = buffer.sample(size, "reward-gamma", generator, cfg.gamma, cfg.buffer_importance_weights)
        return buffer.states[slots, j].float(), j, buffer.cond[slots], weight
    if buffer is not None:
        slots, _, _ = buffer.sample(n_traj, cfg.buffer_sampler, generator)
        states, cond = buffer.states, buffer.cond
    else:
        slots = torch.arange(micro * n_traj, (micro + 1) * n_traj, device=device)
        states, cond = fresh["states"], fresh["cond"]
    rows = slots.repeat_interleave(cfg.steps_per_trajectory)
    j, weight = sample_steps(size, num_steps, cfg.step_sampler, cfg.gamma, generator, device)
    return states[rows, j].float(), j, cond[rows], weight   # gathers only the trained states, not whole trajectories


class Guard:
    """Counts non-finite steps on the device; `check` (at log and checkpoint time) stops a run that keeps failing."""

    def __init__(self, device: torch.device, limit: int, verbose: bool = True):
        self.total = torch.zeros((), dtype=torch.long, device=device)
        self.streak = torch.zeros((), dtype=torch.long, device=device)
        self.limit, self.reported, self.verbose = limit, 0, verbose

    def update(self, finite: Tensor) -> None:
        self.total += (~finite).long()
        self.streak = torch.where(finite, 0, self.streak + 1)

    def check(self, step: int) -> int:
        total, streak = int(self.total), int(self.streak)
        if total > self.reported and self.verbose:
            tqdm.write(f"warning: {total - self.reported} step(s) with a non-finite reward or loss skipped "
                       f"before step {step} ({total} in all)", file=sys.stderr)
        self.reported = max(self.reported, total)
        if streak >= self.limit:
            raise RuntimeError(f"{streak} non-finite steps in a row before step {step} (max_nonfinite_steps="
                               f"{self.limit}); stopped, the last checkpoint is kept")
        return total


def eval_row(step: int, metrics: dict) -> dict:
    return {"step": step, **{f"eval_{k}": v for k, v in metrics.items()}}


def save_samples(task: tasks.Task, images: Tensor, cfg: config.TrainConfig, path: Path) -> None:
    """The task's own plot of evaluation samples, or the first 8 of each condition, one row per condition."""
    if task.plot_samples is not None:
        cond = task.eval_conditions(cfg.eval_per_class).to(images.device)
        task.plot_samples(images, cond, cfg.eval_per_class, path)
        return
    per_class = cfg.eval_per_class
    save_grid(images.view(-1, per_class, *images.shape[1:])[:, :8].flatten(0, 1), path, nrow=8)


def fmt(value: float) -> str:
    return f"{value:.4g}"


def run(cfg: config.TrainConfig, resume: str | None = None) -> dict:
    """Train in this process: alone, or as one rank of a torchrun / accelerate launch (WORLD_SIZE > 1)."""
    with launch(cfg.device) as ctx, ops.use_backend(cfg.kernels):
        return train(cfg, resume, ctx)


def read_run(out: Path, resume: str | None, world: int) -> tuple[dict, dict, list[dict]] | None:
    """Rank 0's checks and reads before any work: None for a new run (refusing to overwrite one), else the
    checkpoint's (adapter, state) and the metrics rows up to its step."""
    if resume is None:
        if (out / "checkpoint").exists():
            raise ValueError(f"out={str(out)!r} already holds a run: pass --resume {out} or choose another --out")
        return None
    adapter, state = checkpoint.load(out)
    if state["world_size"] != world:
        raise ValueError(f"resume={str(out)!r}: the checkpoint was written by {state['world_size']} process(es) and "
                         f"this run has {world} (WORLD_SIZE): resume with {state['world_size']}, e.g. torchrun "
                         f"--nproc_per_node {state['world_size']}, since each process's RNG and buffer shard are "
                         "restored")
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"resume={str(out)!r}: no metrics.jsonl there")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return adapter, state, [row for row in rows if row["step"] <= state["step"]]   # drop what came after it


def train(cfg: config.TrainConfig, resume: str | None = None, ctx: Context | None = None) -> dict:
    start = time.time()
    ctx = ctx or Context(device=resolve_device(cfg.device))
    device, main = ctx.device, ctx.is_main
    kernels, why = ops.backend_for(device)   # an impossible --kernels fails here, before any work
    # rank 0's name: the default one holds the time, which the ranks could read a second apart
    out = Path(ctx.broadcast(cfg.out or f"runs/{cfg.task.replace(':', '-')}-{cfg.method}-"
                                        f"{time.strftime('%Y%m%d-%H%M%S')}"))
    saved = ctx.on_main(lambda: read_run(out, resume, ctx.world))   # fails on every rank before anything is written
    if resume is not None:
        # one checkpoint: the shared state once, each rank's own (RNG, buffer shard, last rollout, log window) apart
        adapter, state, rows = saved if main else (None, None, [])
        own = ctx.scatter(state["ranks"] if main else None)
        adapter, state = ctx.broadcast((adapter, {k: v for k, v in state.items() if k != "ranks"} if main else None))
        adapter, state, own = to_device((adapter, state, own), device)

    task = tasks.resolve(cfg.task)(cfg)
    missing = [name for name in ("features", "eval_conditions") if getattr(task, name) is None]
    if missing:
        raise ValueError(f"task={cfg.task!r} provides no {', '.join(missing)}: the metrics need them")
    reward = rewards.build_reward(cfg.reward, weights=cfg.reward_weights, prompts=task.prompts,
                                  task_reward=task.reward, device=device)
    if reward is not task.reward:   # --reward replaces the task's own
        if isinstance(task.reward, Checkpointed):
            task.reward.fn = reward   # the task's checkpointing switch (checkpoint_reward) applies to it too
        else:
            task.reward = reward
        if isinstance(reward, torch.nn.Module) and all(reward is not m for m in task.frozen):
            task.frozen.append(reward)   # moves with the task's other frozen networks
    task = task.to(device)
    schedule = DDIMSchedule.build(task.scheduler_config, cfg.sample_steps, device)
    params = add_policy_lora(task.unet, task.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    method = make_method(task, schedule, cfg)
    chains = method.trains_on == "chains"   # a baseline: its own on-policy chains, no collect/buffer/draw
    optimizer = make_optimizer(params, cfg, device)
    generator = torch.Generator(device).manual_seed(rank_seed(cfg.seed, ctx.rank))
    micro_size = ctx.split(cfg.batch_size, "batch_size") // cfg.grad_accum   # batch_size is global
    buffer = None
    if cfg.buffer and not chains:
        cond_example = task.sample_conditions(1, torch.Generator(device).manual_seed(0))
        buffer = ReplayBuffer(ctx.split(cfg.buffer_size, "buffer_size"), cfg.sample_steps, task.sample_shape,
                              tuple(cond_example.shape[1:]), cond_example.dtype, device,
                              getattr(torch, cfg.buffer_dtype))
    guard = Guard(device, cfg.max_nonfinite_steps, verbose=main)

    if resume is not None:
        load_adapter_state_dict(task.unet, adapter)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(own["generator"].cpu())
        if buffer is not None:
            buffer.load_state_dict(own["buffer"])
        guard.total.fill_(state["guard"]["total"])
        guard.streak.fill_(state["guard"]["streak"])
        guard.reported = state["guard"]["total"]
        first_step, base, wall_before = state["step"], state["base_metrics"], state["wall_s"]
        base_features = state.get("base_features")   # absent in checkpoints of tasks with real data
        fresh = own["fresh"]     # the last rollout's reward, conditions and images, for logging before the next one
        window = own["window"]   # per-step metrics not yet logged
        if main:
            print(f"resumed {out} at step {first_step}")
    else:
        if main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        base, base_images, base_features = evaluate(method, cfg, ctx, with_kl=False)
        if task.real_features is not None:
            base_features = None   # fd is against real data; only a task without it measures drift from the base
        if main:
            save_samples(task, base_images, cfg, out / "samples_base.png")
        first_step, wall_before, fresh, window = 0, 0.0, None, []
        rows = [eval_row(0, base)]
    metrics_file = None
    if main:
        (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        metrics_file = open(out / "metrics.jsonl", "a")

    def write_row(row: dict) -> None:
        rows.append(row)
        if metrics_file is not None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    def save_checkpoint(step: int) -> None:
        adapter = adapter_state_dict(task.unet)
        own = {"generator": generator.get_state(), "buffer": buffer.state_dict() if buffer is not None else {},
               "fresh": {k: fresh[k] for k in ("reward", "cond", "images")}, "window": window,
               "adapter_digest": tensors_digest(adapter)}
        digests = ctx.all_gather(own["adapter_digest"])
        if len(set(digests)) > 1:   # cannot happen while the gradients are averaged; a guard against silent drift
            raise RuntimeError(f"the ranks' adapters differ at step {step} (digests {digests}): data-parallel "
                               "training lost sync; stopped, the last checkpoint is kept")
        ranks = ctx.gather(own)
        if main:
            state = {"step": step, "optimizer": optimizer.state_dict(), "base_metrics": base,
                     "guard": {"total": int(guard.total), "streak": int(guard.streak)},
                     "base_features": base_features,
                     "wall_s": wall_before + time.time() - start, "world_size": ctx.world, "ranks": ranks}
            checkpoint.save(out, adapter, state)

    if main:
        buffer_mb = buffer.nbytes / 2**20 if buffer is not None else 0.0
        ranks_note = f" | {ctx.world} processes ({dist.get_backend()})" if ctx.distributed else ""
        per_process = " per process" if ctx.distributed else ""
        print(f"task {task.name} | method {cfg.method} | q estimator {method.estimator_name} | device {device} | "
              f"kernels {kernels} ({why}){ranks_note} | "
              f"T={cfg.sample_steps} eta={cfg.eta} w={cfg.guidance} alpha={cfg.alpha} gamma={cfg.gamma} | "
              f"adapter {sum(p.numel() for p in params):,} params | buffer {buffer_mb:.1f} MiB{per_process} | "
              f"run dir {out}")
        print(f"base model: reward {fmt(base['reward'])} | diversity {fmt(base['diversity'])} | fd {fmt(base['fd'])}")

    bar = tqdm(range(first_step, cfg.steps), initial=first_step, total=cfg.steps, disable=not (cfg.progress and main),
               dynamic_ncols=True, desc="sqdf")
    for step in bar:
        if not chains and (buffer is None or step % cfg.replay_ratio == 0):
            n_new = (ctx.split(cfg.rollout_batch, "rollout_batch") if buffer is not None
                     else micro_size * cfg.grad_accum // cfg.steps_per_trajectory)
            fresh = collect(method, n_new, cfg, generator)
            if buffer is not None:
                buffer.add(fresh["states"], fresh["cond"], fresh["reward"], step)
        optimizer.zero_grad(set_to_none=False)
        finite = torch.ones((), dtype=torch.bool, device=device)
        parts = []   # chain methods: each micro-batch's final samples, for logging
        for micro in range(cfg.grad_accum):
            if chains:
                cond = task.sample_conditions(micro_size, generator)
                x_T = torch.randn((micro_size, *task.sample_shape), generator=generator, device=device)
                loss, stats, part = method.chain_loss(cond, x_T, generator)
                parts.append(part)
            else:
                x, j, cond, weight = draw(micro, micro_size, fresh, buffer, cfg, schedule.num_steps, generator)
                loss, stats = method.loss(x, j, cond, weight, generator)
            (loss / cfg.grad_accum).backward()
            finite &= torch.isfinite(loss)
        if chains:
            fresh = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
        finite = ctx.average_gradients(params, finite)   # identity for one process
        # the norm of the (averaged) gradient before clipping, logged; an infinite bound multiplies by exactly 1
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        guarded_step(optimizer, finite)
        guard.update(finite)
        window.append({"loss": loss.detach(), "reward": fresh["reward"].mean(), "grad_norm": grad_norm, **stats})

        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            keys = list(window[0])
            local = torch.stack([torch.stack([w[k] for w in window]).float().mean() for k in keys])
            means = dict(zip(keys, ctx.mean(local).tolist()))   # equal batches per rank: the global means
            window.clear()
            features, fresh_cond = ctx.gather_rows(task.features(fresh["images"])), ctx.gather_rows(fresh["cond"])
            row = {"step": done, **means, "diversity": per_class_diversity(features, fresh_cond),
                   "nonfinite_steps": guard.check(done), "wall_s": round(wall_before + time.time() - start, 2)}
            write_row(row)
            bar.set_postfix(reward=fmt(row["reward"]), kl=fmt(row["kl_term"]))
            if main:
                tqdm.write(f"step {done:4d}/{cfg.steps} | reward {fmt(row['reward'])} | kl {fmt(row['kl_term'])} | "
                           f"diversity {fmt(row['diversity'])} | loss {fmt(row['loss'])}")
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            metrics, _, _ = evaluate(method, cfg, ctx, with_kl=True, base_features=base_features)
            write_row(eval_row(done, metrics))
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            guard.check(done)
            save_checkpoint(done)
    bar.close()

    final, final_images, _ = evaluate(method, cfg, ctx, with_kl=True, base_features=base_features)
    write_row(eval_row(cfg.steps, final))
    summary = {"reward_base": base["reward"], "reward_final": final["reward"],
               "diversity_base": base["diversity"], "diversity_final": final["diversity"],
               "fd_base": base["fd"], "fd_final": final["fd"], "kl_final": final["kl"], "steps": cfg.steps,
               "wall_s": round(wall_before + time.time() - start, 1)}
    for name in final.keys() - {"reward", "diversity", "fd", "kl"}:   # the task's target metrics
        summary.update({f"{name}_base": base.get(name), f"{name}_final": final[name]})
    if main:
        metrics_file.close()
        save_samples(task, final_images, cfg, out / "samples_final.png")
        save_curves(rows, out / "curves.png", ("reward", "reward_q", "kl_term", "diversity", "loss", "eval_reward",
                                               "eval_diversity", "eval_fd", "eval_kl"))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if isinstance(task.unet, UNet2DConditionModel):   # a diffusers pipeline's UNet: its users' LoRA format
            save_diffusers_lora(task.unet, out / "lora")
        print_table(base, final, summary["wall_s"], out)
    return summary


def print_table(base: dict, final: dict, wall_s: float, out: Path) -> None:
    print(f"\n{'':14s}{'base':>12s}{'fine-tuned':>12s}")
    for key, label in (("reward", "reward"), ("diversity", "diversity"), ("fd", "fd"), ("kl", "KL (nats)")):
        print(f"{label:14s}{base[key]:12.4f}{final[key]:12.4f}")
    print(f"diversity kept: {100 * final['diversity'] / base['diversity']:.0f}% of base | wall {wall_s:.0f} s | "
          f"run directory {out}")


def main(argv: list[str] | None = None) -> None:
    cfg, resume = config.parse(argv)
    try:
        run(cfg, resume)
    except (ValueError, RuntimeError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
