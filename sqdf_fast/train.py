"""`python -m sqdf_fast.train`: fine-tune a diffusion model toward a reward with SQDF or a baseline.

Reads top to bottom, in named pieces that other loops (the black-box optimiser) drive as a library:

    run = build_run(cfg, ctx, resume)   task, policy adapter, method (and its buffer), optimizer; then the resumed
                                        checkpoint, or the base model's evaluation
    train_until(run, steps)             optimizer steps (`train_step`), with log lines, evaluations and checkpoints
    summary = finish(run)               final evaluation, plots, summary.json

Nothing inside a training step reads a tensor value on the host: metrics stay on the device until a log line, and
a non-finite loss is skipped on the device.

Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) every process runs this same loop data-parallel
(sqdf_fast.distributed): batch_size, rollout_batch and buffer_size are global and split evenly; each rank draws its
own noise and keeps its own buffer shard; the adapter gradients are averaged over the ranks before clipping and the
step; metrics are averaged or gathered; only rank 0 prints and writes the run directory and checkpoints.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from sqdf_fast import checkpoint, cli, config, files, methods, ops, tasks, tracking
from sqdf_fast.adapters import adapter_state_dict, add_policy_lora, load_adapter_state_dict
from sqdf_fast.distributed import Context, launch, resolve_device, tensors_digest, to_device
from sqdf_fast.export import save_diffusers_lora
from sqdf_fast.memory import keep_freed_cpu_memory
from sqdf_fast.methods import Method
from sqdf_fast.metrics import per_class_diversity, per_class_fd
from sqdf_fast.plots import save_curves, save_grid
from sqdf_fast.rewards import reward_terms
from sqdf_fast.rollout import rollout
from sqdf_fast.schedule import DDIMSchedule

EVAL_SEED_OFFSET = 99_991       # evaluation noise comes from its own generator: same seeds for base and final
QUALITY_METRICS = ("reward", "diversity", "fd", "path_kl")   # plus the task's target metrics where it knows them
# nonfinite_samples: evaluation samples whose reward is NaN or Inf (left out of the reward's mean)
EVAL_METRICS = QUALITY_METRICS + ("nonfinite_samples",)
SUMMARY_KEYS = ("reward_base", "reward_final", "diversity_base", "diversity_final", "fd_base", "fd_final",
                "path_kl_final", "nonfinite_samples_base", "nonfinite_samples_final", "steps", "wall_s")
# what a run directory holds: a new run refuses a folder with any of them (overwriting one could lose the run)
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoint", "checkpoint.prev", "checkpoint.tmp")
CURVES = ("reward", "reward_q", "kl_term", "diversity", "loss", "eval_reward", "eval_diversity", "eval_fd",
          "eval_path_kl")


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

    def state_dict(self) -> dict:
        return {"total": int(self.total), "streak": int(self.streak)}

    def load_state_dict(self, state: dict) -> None:
        self.total.fill_(state["total"])
        self.streak.fill_(state["streak"])
        self.reported = state["total"]


@torch.no_grad()
def evaluate(method: Method, cfg: config.TrainConfig, ctx: Context, base: bool = False,
             base_features: dict[int, Tensor] | None = None) -> tuple[dict, Tensor, dict[int, Tensor]]:
    """Reward, diversity, fd and path KL to the base (nats) of fixed-seed samples of the policy, or with `base` of
    the base model itself (the reference: adapter off; path KL 0); the samples; their features by condition. fd is
    against the task's real data, or, for a task without any (real_features None), against `base_features`, the
    base model's own evaluation features (None: these samples' own, so the base's fd is 0): then fd measures the
    drift from the base model.

    With several ranks each samples a contiguous shard of the evaluation conditions, drawing that shard's rows of
    the same x_T and per-step noise a single process draws for the whole batch (same seeds on every rank), so the
    samples are the ones one process would make; images, rewards, features and KLs are gathered and every rank
    computes the same metrics."""
    task, device = method.task, ctx.device
    cond = task.eval_conditions(cfg.eval_per_class).to(device)
    generator = torch.Generator(device).manual_seed(cfg.seed + EVAL_SEED_OFFSET)
    x_T = torch.randn((cond.shape[0], *task.sample_shape), generator=generator, device=device)
    rows = ctx.shard(cond.shape[0])
    sampler, reference = (method.reference_eps, None) if base else (method.policy_eps, method.reference_eps)
    _, x0, path_kl = rollout(sampler, method.schedule, x_T[rows], cond[rows], cfg.eta, generator, reference,
                             batch_rows=(rows, cond.shape[0]))
    images = task.decode(x0)
    reward, features = task.reward(images, cond[rows]), task.features(images)
    terms = reward_terms(task.reward)   # a weighted sum's terms at this call, logged one by one
    images, reward, features = ctx.gather_rows(images), ctx.gather_rows(reward), ctx.gather_rows(features)
    by_class = {int(c): features[cond == c] for c in torch.unique(cond).tolist()}
    if task.real_features is not None:
        reference = task.real_features(cond)
    else:
        reference = base_features if base_features is not None else by_class
    finite = torch.isfinite(reward)
    metrics = {"reward": float(reward[finite].mean()),   # NaN (null in the files) when no reward is finite
               "diversity": per_class_diversity(features, cond),
               "fd": per_class_fd(features, cond, reference),
               "path_kl": 0.0 if base else float(ctx.gather_rows(path_kl).mean()),
               "nonfinite_samples": int((~finite).sum())}
    metrics.update({f"reward_{name}": float(ctx.gather_rows(value)[finite].mean()) for name, value in terms.items()})
    if metrics["nonfinite_samples"] and ctx.is_main:
        tqdm.write(f"warning: {metrics['nonfinite_samples']} of {reward.shape[0]} evaluation samples"
                   f"{' of the base model' if base else ''} have a non-finite reward: the reported reward is the "
                   "mean of the others", file=sys.stderr)
    if task.target_metrics is not None:
        metrics.update(task.target_metrics(images, cond))
    return metrics, images, by_class


def eval_row(step: int, metrics: dict) -> dict:
    return {"step": step, **{f"eval_{k}": v for k, v in metrics.items()}}


def save_samples(task: tasks.Task, images: Tensor, cfg: config.TrainConfig, path: Path,
                 quiet: bool = False) -> Path | None:
    """The task's own plot of evaluation samples, or the first 8 of each condition, one row per condition; samples
    that are not images (not (C, H, W) with 1 or 3 channels) and have no plot of their own are not drawn (None;
    a note unless `quiet`). Returns the path written."""
    if task.plot_samples is not None:
        cond = task.eval_conditions(cfg.eval_per_class).to(images.device)
        task.plot_samples(images, cond, cfg.eval_per_class, path)
        return path
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        if not quiet:
            tqdm.write(f"note: no {path.name}: task {task.name!r} has samples of shape {tuple(images.shape[1:])}, "
                       "not images, and no plot_samples of its own")
        return None
    per_class = cfg.eval_per_class
    if images.shape[0] % per_class:   # a task whose evaluation conditions are not per_class of each class
        save_grid(images[:64], path, nrow=8)
        return path
    save_grid(images.view(-1, per_class, *images.shape[1:])[:, :8].flatten(0, 1), path, nrow=8)
    return path


def samples_caption(task: tasks.Task, cfg: config.TrainConfig) -> str:
    """What the evaluation grid shows: its rows' conditions (prompts, or classes)."""
    if task.plot_samples is not None:
        return f"{task.name}: the task's plot of its evaluation samples (same seeds at every evaluation)"
    cond = task.eval_conditions(cfg.eval_per_class)
    if cond.dim() != 1 or cond.is_floating_point() or cond.shape[0] % cfg.eval_per_class:
        return f"{task.name}: evaluation samples (same seeds at every evaluation)"
    rows = list(dict.fromkeys(cond.tolist()))
    names = [task.prompts[c] if task.prompts is not None else f"class {c}" for c in rows]
    return (f"{task.name}: the first {min(8, cfg.eval_per_class)} samples of each condition, in order, 8 to a row, "
            "the same seeds at every evaluation; conditions: " + "; ".join(names))


def track_samples(run: Run, images: Tensor, step: int, path: Path | None = None) -> None:
    """The evaluation grid (the PNG at `path`, or one drawn to a temporary file) to the run's trackers, as the image
    `eval/samples` at `step`, with its caption."""
    if not run.tracker.active:
        return
    with tempfile.TemporaryDirectory() as tmp:
        if path is None:
            path = save_samples(run.task, images, run.cfg, Path(tmp) / "samples.png", quiet=True)
        if path is None:
            return
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    run.tracker.log_images(step, "eval/samples", pixels, samples_caption(run.task, run.cfg))


def fmt(value: float) -> str:
    return f"{value:.4g}"


# ---- a run --------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything one training run holds; `build_run` makes it, the pieces below advance and save it."""
    cfg: config.TrainConfig
    ctx: Context
    out: Path
    task: tasks.Task
    schedule: DDIMSchedule
    method: Method
    params: list[Tensor]
    optimizer: torch.optim.AdamW
    generator: torch.Generator
    guard: Guard
    start: float                                  # time.time() when this process started the run
    step: int = 0                                 # optimizer steps done
    wall_before: float = 0.0                      # wall seconds of the run before a resume
    base: dict = field(default_factory=dict)      # the base model's evaluation
    base_features: dict | None = None             # its features, where fd measures the drift from it
    rows: list[dict] = field(default_factory=list)      # metrics.jsonl's rows
    lines: list[str] = field(default_factory=list)      # and its lines, as written (a checkpoint records their digest)
    window: list[dict] = field(default_factory=list)    # per-step device metrics not yet logged
    metrics_file: IO | None = None                # rank 0's open metrics.jsonl
    extra: dict = field(default_factory=dict)     # a driving loop's own state (the black-box loop's round), saved
                                                  # in the checkpoint with the rest
    tracker: tracking.Tracker = field(default_factory=tracking.Tracker)   # rank 0's --log-to trackers
    adapter_at_log: list[Tensor] | None = None    # the adapter at the last log row (its update goes to the trackers)

    @property
    def wall_s(self) -> float:
        return self.wall_before + time.time() - self.start

    def write_row(self, row: dict) -> None:
        line, replaced = files.dumps(row)
        if replaced and self.ctx.is_main:
            tqdm.write(f"warning: metrics.jsonl, step {row['step']}: {', '.join(replaced)} not finite, written as "
                       "null", file=sys.stderr)
        self.rows.append(row)
        self.lines.append(line + "\n")
        if self.metrics_file is not None:
            self.metrics_file.write(line + "\n")
            self.metrics_file.flush()
        self.tracker.log_scalars(row["step"], tracking.row_scalars(row))


def lines_digest(lines: list[str]) -> str:
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def read_run(cfg: config.TrainConfig, out: Path, resume: str | None,
             world: int) -> tuple[dict, dict, list[str], dict] | None:
    """Rank 0's checks and reads before any work: None for a new run (refusing to overwrite one), else the
    checkpoint's (adapter, state), the metrics lines it was written after (checked against its digest) and the
    options this resume changes ({name: [saved, new]}; config.RESUMABLE)."""
    if resume is None:
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found:   # e.g. only checkpoint.prev/ after a kill during the swap: the run's only checkpoint
            hint = (f"pass --resume {out} or choose another --out" if {"checkpoint", "checkpoint.prev"} & set(found)
                    else "it has no checkpoint to resume from: delete it or choose another --out")
            raise cli.UsageError(f"out={str(out)!r} already holds a run ({', '.join(found)}): {hint}")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"out={str(out)!r}: cannot create the folder ({err.strerror or err})") from err
        return None
    changes = config.resume_changes(config.read_saved(out), dataclasses.asdict(cfg), config.RESUMABLE,
                                    f"resume={str(out)!r}")
    adapter, state = checkpoint.load(out)
    if state["world_size"] != world:
        raise cli.UsageError(f"resume={str(out)!r}: the checkpoint was written by {state['world_size']} "
                             f"process(es) and this run has {world} (WORLD_SIZE): resume with "
                             f"{state['world_size']}, e.g. torchrun --nproc_per_node {state['world_size']}, since "
                             "each process's RNG and buffer shard are restored")
    return adapter, state, read_metrics(out, state), changes


def read_metrics(out: Path, state: dict) -> list[str]:
    """The metrics.jsonl lines written before the checkpoint `state` (those after it are dropped): exactly as many
    as it counted, matching its digest; ValueError when metrics.jsonl lost or changed any of them."""
    path, count, what = out / "metrics.jsonl", state["metrics_rows"], f"resume={str(out)!r}"
    if not path.is_file():
        raise ValueError(f"{what}: no metrics.jsonl there (the checkpoint at step {state['step']} follows {count} "
                         "rows of it)")
    lines = path.read_text().splitlines(keepends=True)[:count]
    if len(lines) < count or not lines[-1].endswith("\n"):
        raise ValueError(f"{what}: metrics.jsonl is truncated: it holds {len(lines)} complete row(s), the checkpoint "
                         f"at step {state['step']} was written after {count}; the run's history is incomplete, so "
                         "it is not resumed (restore metrics.jsonl from a copy)")
    if lines_digest(lines) != state["metrics_digest"]:
        raise ValueError(f"{what}: the first {count} rows of metrics.jsonl differ from those the checkpoint at step "
                         f"{state['step']} was written after (the file changed since)")
    return lines


def build_run(cfg: config.TrainConfig, ctx: Context, resume: str | None = None) -> Run:
    """A run ready to train: new (base model evaluated, config.json written) or resumed from `resume`'s checkpoint.
    Every check that can fail runs on every rank before anything is written."""
    start = time.time()
    device = ctx.device
    kernels, why = ops.backend_for(device)   # an impossible --kernels fails here, before any work
    # rank 0's name: the default one holds the time, which the ranks could read a second apart
    if resume is not None and cfg.out is not None and Path(cfg.out) != Path(resume):
        raise cli.UsageError(f"out={cfg.out!r}: a resumed run continues in its own folder ({resume}); copy the "
                             "folder first to branch it")
    out = Path(ctx.broadcast(resume or cfg.out or f"runs/{cfg.task.replace(':', '-')}-{cfg.method}-"
                                                  f"{time.strftime('%Y%m%d-%H%M%S')}"))
    saved = ctx.on_main(lambda: read_run(cfg, out, resume, ctx.world))
    task = tasks.build(cfg, device)
    schedule = DDIMSchedule.build(task.scheduler_config, cfg.sample_steps, device)
    params = add_policy_lora(task.unet, task.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    method = methods.build(task, schedule, cfg, ctx.world)
    run = Run(cfg, ctx, out, task, schedule, method, params, make_optimizer(params, cfg, device),
              torch.Generator(device).manual_seed(rank_seed(cfg.seed, ctx.rank)),
              Guard(device, cfg.max_nonfinite_steps, verbose=ctx.is_main), start)
    try:
        if resume is not None:
            restore(run, saved)
        open_tracker(run, resume is not None)
        if resume is None:
            evaluate_base(run)
    except BaseException:
        run.tracker.close()
        raise
    if ctx.is_main:
        files.write_text_atomic(out / "metrics.jsonl", "".join(run.lines))
        run.metrics_file = open(out / "metrics.jsonl", "a")
        if resume is not None and saved[3]:   # what this resume changed, in the run's own record
            files.write_text_atomic(out / "config.json", config_text(cfg))
            run.write_row({"step": run.step, "resumed_with": saved[3]})
        print_start(run, f"{kernels} ({why})")
    return run


def restore(run: Run, saved: tuple | None) -> None:
    """The checkpoint's adapter, optimizer, guard and step, and this rank's own RNG, method state (replay buffer
    shard, last samples) and log window. One checkpoint holds the shared state once and each rank's own apart."""
    ctx, main = run.ctx, run.ctx.is_main
    adapter, state, lines, changes = saved if main else (None, None, [], {})
    own = ctx.scatter(state["ranks"] if main else None)
    adapter, state = ctx.broadcast((adapter, {k: v for k, v in state.items() if k != "ranks"} if main else None))
    adapter, state, own = to_device((adapter, state, own), ctx.device)
    load_adapter_state_dict(run.task.unet, adapter)
    run.optimizer.load_state_dict(state["optimizer"])
    for group in run.optimizer.param_groups:   # a resume's --lr applies from here on (Adam's moments are kept)
        group["lr"] = run.cfg.lr
    run.generator.set_state(own["generator"].cpu())
    run.method.load_state_dict(own["method"])
    run.guard.load_state_dict(state["guard"])
    run.step, run.base, run.wall_before = state["step"], state["base_metrics"], state["wall_s"]
    run.base_features, run.extra = state["base_features"], state.get("extra", {})
    run.window, run.lines = own["window"], lines
    run.rows = [json.loads(line) for line in lines]   # as written: the digest matched
    if main:
        changed = "".join(f" | {name} {old} -> {new}" for name, (old, new) in changes.items())
        print(f"resumed {run.out} at step {run.step}{changed}")


def open_tracker(run: Run, resumed: bool) -> None:
    """Rank 0's --log-to trackers (sqdf_fast.tracking), with the config; the adapter as the first update's start."""
    if not run.ctx.is_main:
        return
    run.tracker = tracking.open_tracker(run.cfg.log_to, run.out, dataclasses.asdict(run.cfg), name=run.out.name,
                                        group=run.cfg.log_group, resumed_at=run.step if resumed else None)
    if run.tracker.active:
        run.adapter_at_log = [p.detach().clone() for p in run.params]


def evaluate_base(run: Run) -> None:
    """A new run: config.json, and the base model evaluated and drawn."""
    cfg, task, main = run.cfg, run.task, run.ctx.is_main
    if main:
        files.write_text_atomic(run.out / "config.json", config_text(cfg))
    run.base, base_images, base_features = evaluate(run.method, cfg, run.ctx, base=True)
    # fd is against real data where the task has it; only a task without it measures drift from the base
    run.base_features = None if task.real_features is not None else base_features
    run.rows, run.lines = [], []
    run.write_row(eval_row(0, run.base))   # metrics.jsonl is (re)written from run.lines after build_run's checks
    if main:
        track_samples(run, base_images, 0, save_samples(task, base_images, cfg, run.out / "samples_base.png"))


def config_text(cfg: config.TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=1, allow_nan=False)   # config.validate: every float finite


def print_start(run: Run, kernels: str) -> None:
    cfg, ctx, method = run.cfg, run.ctx, run.method
    buffer_mb = method.buffer.nbytes / 2**20 if method.buffer is not None else 0.0
    ranks_note = f" | {ctx.world} processes ({dist.get_backend()})" if ctx.distributed else ""
    per_process = " per process" if ctx.distributed else ""
    print(f"task {run.task.name} | method {cfg.method} | q estimator {method.estimator_name} | device {ctx.device} | "
          f"kernels {kernels}{ranks_note} | "
          f"T={cfg.sample_steps} eta={cfg.eta} w={cfg.guidance} alpha={cfg.alpha} gamma={cfg.gamma} | "
          f"adapter {sum(p.numel() for p in run.params):,} params | buffer {buffer_mb:.1f} MiB{per_process} | "
          f"run dir {run.out}")
    base = run.base
    print(f"base model: reward {fmt(base['reward'])} | diversity {fmt(base['diversity'])} | fd {fmt(base['fd'])}")


# ---- training -----------------------------------------------------------------------------------------------------
def train_step(run: Run) -> None:
    """One optimizer step: the method's preparation (SQDF: a rollout into its buffer when due), its micro-batch
    losses, averaged gradients (identity for one process), clipping, and the step, skipped when not finite."""
    cfg, method, generator = run.cfg, run.method, run.generator
    method.prepare(run.step, generator)
    run.optimizer.zero_grad(set_to_none=False)
    finite = torch.ones((), dtype=torch.bool, device=run.ctx.device)
    for micro in range(cfg.grad_accum):
        loss, stats = method.micro_loss(micro, generator)
        (loss / cfg.grad_accum).backward()
        finite &= torch.isfinite(loss)
    finite = run.ctx.average_gradients(run.params, finite)
    # the norm of the (averaged) gradient before clipping, logged; an infinite bound multiplies by exactly 1
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    guarded_step(run.optimizer, finite)
    run.guard.update(finite)
    run.window.append({"loss": loss.detach(), "reward": method.fresh["reward"].mean(), "grad_norm": grad_norm,
                       **stats})
    run.step += 1


def log_step(run: Run) -> dict:
    """A metrics.jsonl row of the window's means (over the ranks too) and the newest samples' diversity."""
    ctx, fresh = run.ctx, run.method.fresh
    keys = list(run.window[0])
    local = torch.stack([torch.stack([w[k] for w in run.window]).float().mean() for k in keys])
    means = dict(zip(keys, ctx.mean(local).tolist()))   # equal batches per rank: the global means
    run.window.clear()
    features, fresh_cond = ctx.gather_rows(run.task.features(fresh["images"])), ctx.gather_rows(fresh["cond"])
    row = {"step": run.step, **means, "diversity": per_class_diversity(features, fresh_cond),
           "nonfinite_steps": run.guard.check(run.step), "wall_s": round(run.wall_s, 2)}
    run.write_row(row)
    if run.tracker.active:   # the adapter's update since the last row: the norm of each LoRA tensor's change
        norms = tracking.update_norms(run.params, run.adapter_at_log)
        run.tracker.log_histogram(run.step, "adapter/update_norm", norms)
        run.tracker.log_scalars(run.step, {"adapter/update_norm_total": float(norms.norm())})
        run.adapter_at_log = [p.detach().clone() for p in run.params]
    if ctx.is_main:
        tqdm.write(f"step {run.step:4d}/{run.cfg.steps} | reward {fmt(row['reward'])} | kl_term "
                   f"{fmt(row['kl_term'])} | diversity {fmt(row['diversity'])} | loss {fmt(row['loss'])}")
    return row


def save_checkpoint(run: Run) -> None:
    """The shared state once (rank 0 writes it) and each rank's own; refuses to save adapters that drifted apart."""
    ctx = run.ctx
    run.guard.check(run.step)
    adapter = adapter_state_dict(run.task.unet)
    own = {"generator": run.generator.get_state(), "method": run.method.state_dict(), "window": run.window,
           "adapter_digest": tensors_digest(adapter)}
    digests = ctx.all_gather(own["adapter_digest"])
    if len(set(digests)) > 1:   # cannot happen while the gradients are averaged; a guard against silent drift
        raise RuntimeError(f"the ranks' adapters differ at step {run.step} (digests {digests}): data-parallel "
                           "training lost sync; stopped, the last checkpoint is kept")
    ranks = ctx.gather(own)
    if ctx.is_main:
        state = {"step": run.step, "optimizer": run.optimizer.state_dict(), "base_metrics": run.base,
                 # what metrics.jsonl holds now: a resume checks it still does
                 "metrics_rows": len(run.lines), "metrics_digest": lines_digest(run.lines),
                 "guard": run.guard.state_dict(), "base_features": run.base_features, "wall_s": run.wall_s,
                 "world_size": ctx.world, "ranks": ranks, "extra": run.extra}
        checkpoint.save(run.out, adapter, state)


def train_until(run: Run, last_step: int, save: bool = True, desc: str = "sqdf") -> None:
    """Optimizer steps up to `last_step`, with a log row every log_every steps, an evaluation every eval_every and,
    with `save`, a checkpoint every checkpoint_every (and at the last step). A loop that saves at points of its own
    (the black-box loop, at round ends) passes save=False; `desc` labels the progress bar."""
    cfg = run.cfg
    bar = tqdm(range(run.step, last_step), initial=run.step, total=last_step, dynamic_ncols=True, desc=desc,
               disable=not (cfg.progress and run.ctx.is_main))
    for _ in bar:
        train_step(run)
        done = run.step
        if done % cfg.log_every == 0 or done == last_step:
            row = log_step(run)
            bar.set_postfix(reward=fmt(row["reward"]), kl_term=fmt(row["kl_term"]))
        if cfg.eval_every and done % cfg.eval_every == 0 and done != last_step:
            metrics, images, _ = evaluate(run.method, cfg, run.ctx, base_features=run.base_features)
            run.write_row(eval_row(done, metrics))
            track_samples(run, images, done)
        if save and (done % cfg.checkpoint_every == 0 or done == last_step):
            save_checkpoint(run)
    bar.close()


def finish(run: Run) -> dict:
    """The final evaluation against the base, curves, samples, summary.json (and the diffusers LoRA file of an SD
    task); returns the summary."""
    cfg, base, main = run.cfg, run.base, run.ctx.is_main
    final, final_images, _ = evaluate(run.method, cfg, run.ctx, base_features=run.base_features)
    run.write_row(eval_row(run.step, final))
    summary = {"reward_base": base["reward"], "reward_final": final["reward"],
               "diversity_base": base["diversity"], "diversity_final": final["diversity"],
               "fd_base": base["fd"], "fd_final": final["fd"], "path_kl_final": final["path_kl"],
               "nonfinite_samples_base": base["nonfinite_samples"],
               "nonfinite_samples_final": final["nonfinite_samples"], "steps": run.step,
               "wall_s": round(run.wall_s, 1)}
    for name in final.keys() - set(EVAL_METRICS):   # the task's target metrics
        summary.update({f"{name}_base": base.get(name), f"{name}_final": final[name]})
    if main:
        run.metrics_file.close()
        track_samples(run, final_images, run.step, save_samples(run.task, final_images, cfg,
                                                                run.out / "samples_final.png"))
        run.tracker.close()
        save_curves(run.rows, run.out / "curves.png", CURVES)
        text, replaced = files.dumps(summary, indent=1)
        if replaced:
            tqdm.write(f"warning: summary.json: {', '.join(replaced)} not finite, written as null", file=sys.stderr)
        files.write_text_atomic(run.out / "summary.json", text)
        if isinstance(run.task.unet, UNet2DConditionModel):   # a diffusers pipeline's UNet: its users' LoRA format
            save_diffusers_lora(run.task.unet, run.out / "lora")
        print_table(base, final, summary["wall_s"], run.out)
    return summary


def print_table(base: dict, final: dict, wall_s: float, out: Path) -> None:
    print(f"\n{'':14s}{'base':>12s}{'fine-tuned':>12s}")
    for key, label in (("reward", "reward"), ("diversity", "diversity"), ("fd", "fd"), ("path_kl", "path KL")):
        print(f"{label:14s}{base[key]:12.4f}{final[key]:12.4f}")
    print(f"path KL in nats to the base model | diversity kept: {100 * final['diversity'] / base['diversity']:.0f}% "
          f"of base | wall {wall_s:.0f} s | run directory {out}")


def train(cfg: config.TrainConfig, resume: str | None = None, ctx: Context | None = None) -> dict:
    """Build (or resume) the run, train it to cfg.steps, finish it; returns the summary."""
    run = build_run(cfg, ctx or Context(device=resolve_device(cfg.device)), resume)
    try:
        train_until(run, cfg.steps)
        return finish(run)
    finally:
        run.tracker.close()


def run(cfg: config.TrainConfig, resume: str | None = None) -> dict:
    """Train in this process: alone, or as one rank of a torchrun / accelerate launch (WORLD_SIZE > 1). `cfg` is
    validated first (ValueError naming the first impossible value); `resume`: the run directory to continue, whose
    saved options `cfg` may change only where config.RESUMABLE allows. Returns the summary (summary.json)."""
    config.validate(cfg)
    with launch(cfg.device) as ctx, ops.use_backend(cfg.kernels):
        if ctx.device.type == "cpu":
            keep_freed_cpu_memory()
        return train(cfg, resume, ctx)


def resume(run_dir: str | Path, **changes) -> dict:
    """Continue the run in `run_dir` from its checkpoint with its saved options, `changes` applied (only those in
    config.RESUMABLE, e.g. steps=200 to train longer); returns the new summary."""
    values = {**config.read_saved(Path(run_dir)), **changes, "out": str(run_dir)}
    return run(config.from_dict(values, f"resume={str(run_dir)!r}"), resume=str(run_dir))


@dataclass
class Results:
    """What a run directory holds, read back (`load_results`)."""
    path: Path
    config: config.TrainConfig
    summary: dict | None        # summary.json; None while the run is unfinished
    metrics: list[dict]         # metrics.jsonl's rows: logged steps, evaluations (eval_*), resumes

    def curve(self, key: str) -> list[tuple[int, float | None]]:
        """(step, value) of every row holding `key`, e.g. "reward" (logged steps) or "eval_fd" (evaluations)."""
        return [(row["step"], row[key]) for row in self.metrics if key in row]


def load_results(run_dir: str | Path) -> Results:
    """A run directory's config, summary and metrics rows (a partial last line of a killed run is left out)."""
    path = Path(run_dir)
    cfg = config.from_dict(config.read_saved(path), str(path / "config.json"))
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else None
    lines = (path / "metrics.jsonl").read_text().splitlines(keepends=True) if (path / "metrics.jsonl").is_file() else []
    return Results(path, cfg, summary, [json.loads(line) for line in lines if line.endswith("\n")])


def main(argv: list[str] | None = None) -> None:
    cfg, resume_dir = config.parse(argv)   # a usage error exits 2
    with cli.run_errors():
        run(cfg, resume_dir)


if __name__ == "__main__":
    main()
