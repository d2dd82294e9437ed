"""Train the digits task's networks from scratch: `python -m sqdf_fast.pretrain --out DIR`.

Seeded and reproducible on the CPU. Trains, in order: the reward classifier, the evaluator (another architecture and
seed), the class-conditional base diffusion model (with EMA) and the consistency model distilled from it; then
measures the consistency model's one-step x0 against the base's Tweedie estimate and against multi-step samples.
Writes float16 safetensors, `pretrain_report.json` (settings, losses, measurements, wall time) and
`pretrain_samples.png` into DIR. The shipped weights in sqdf_fast/weights/digits/ were made by the defaults.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from sqdf_fast.consistency import ConsistencyModel, distill
from sqdf_fast.metrics import per_class_diversity, per_class_fd
from sqdf_fast.ops import reference
from sqdf_fast.plots import save_grid
from sqdf_fast.rollout import guided_eps, rollout
from sqdf_fast.schedule import DDIMSchedule
from sqdf_fast.tasks import digits


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random shifts of up to one pixel, so the classifiers do not key on exact positions."""
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy:dy + images.shape[-2], dx:dx + images.shape[-1]]


def train_classifier(model: nn.Module, images: Tensor, targets: Tensor, val: tuple[Tensor, Tensor], steps: int,
                     seed: int, loss_fn, predict) -> dict:
    """Train on shifted images; report the validation accuracy of predict(model(images)) against the targets."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (128,), generator=generator)
        loss = loss_fn(model(augment(images[idx], generator)), targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.requires_grad_(False).eval()
    accuracy = float((predict(model(val[0])) == val[1]).float().mean())
    return {"steps": steps, "final_loss": loss.detach().item(), "val_accuracy": accuracy}


def train_base(unet: nn.Module, images: Tensor, labels: Tensor, schedule: DDIMSchedule, steps: int, batch: int,
               lr: float, seed: int, log) -> tuple[nn.Module, list[float]]:
    """Epsilon-prediction DDPM training with 10% null-class dropout; returns the EMA model and the loss history."""
    generator = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    lr_at = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    alphas = schedule.alphas_cumprod
    losses = []
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=generator)
        x0, cond = images[idx], labels[idx].clone()
        cond[torch.rand(batch, generator=generator) < 0.1] = digits.NULL_CLASS
        t = torch.randint(0, alphas.shape[0], (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = reference.per_sample(alphas[t], x0)
        loss = F.mse_loss(digits.unet_eps(unet, a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - min(0.999, (1 + step) / (10 + step)))
        losses.append(loss.detach().item())
        log("base", step, losses[-1])
    return ema.eval(), losses


@torch.no_grad()
def measure(base: nn.Module, cm: ConsistencyModel, classifier: nn.Module, evaluator: nn.Module, images: Tensor,
            labels: Tensor, schedule: DDIMSchedule, guidance: float, seed: int, n: int) -> tuple[dict, Tensor]:
    """The consistency model's one-step x0 against the base's Tweedie estimate and against multi-step samples.

    From real digits noised to t_j, for each one-step estimate: its MSE to the clean digit (Tweedie, the posterior
    mean, is MSE-optimal by construction), its Frechet distance to real digits in evaluator features (is it a
    plausible digit, which is what a reward trained on clean digits can judge), and how well r(estimate) predicts
    the reward of the base model's own multi-step continuations from the same x_t, E[r(x0) | x_t] (the soft value
    at low temperature): mean absolute error and per-sample correlation.
    """
    generator = torch.Generator().manual_seed(seed)
    continuations, per_class = 4, max(8, n // 4)
    idx = torch.randperm(images.shape[0], generator=generator)[:n]
    x0, cond = images[idx], labels[idx]
    denoiser = lambda x, t, c: guided_eps(lambda *a: digits.unet_eps(base, *a), x, t, c,
                                          torch.full_like(c, digits.NULL_CLASS), guidance)
    reward = digits.BoldnessReward(classifier)
    real = {c: evaluator.features(images[labels == c]) for c in range(digits.NUM_CLASSES)}
    by_noise = []
    steps = schedule.num_steps
    for j in sorted({0, steps // 10, steps // 4, steps // 2, 3 * steps // 4, steps - 1}):
        t_value = int(schedule.timesteps[j])
        t = torch.full((n,), t_value)
        a = schedule.alpha_t[j]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=generator)
        estimates = {"tweedie": reference.tweedie_x0(x_t, denoiser(x_t, t, cond).combined(), a),
                     "consistency": cm(x_t, t, cond)}
        _, samples, _ = rollout(denoiser, schedule, x_t.repeat(continuations, 1, 1, 1), cond.repeat(continuations),
                                1.0, generator, first_step=j)
        target = reward(samples, cond.repeat(continuations)).view(continuations, n).mean(0)
        row = {"t": t_value, "alpha_bar": float(a), "reward_of_multistep_continuations": float(target.mean())}
        for name, est in estimates.items():
            r = reward(est, cond)
            row[f"mse_to_data_{name}"] = float((est - x0).square().mean())
            row[f"fd_{name}"] = per_class_fd(evaluator.features(est), cond, real)
            row[f"reward_{name}"] = float(r.mean())
            row[f"soft_q_abs_error_{name}"] = float((r - target).abs().mean())
            row[f"soft_q_correlation_{name}"] = float(torch.corrcoef(torch.stack([r, target]))[0, 1])
        by_noise.append(row)
    eval_cond = torch.arange(digits.NUM_CLASSES).repeat_interleave(per_class)
    x_T = torch.randn((eval_cond.shape[0], *images.shape[1:]), generator=generator)
    _, multi_step, _ = rollout(denoiser, schedule, x_T, eval_cond, 1.0, generator)
    one_step = cm(x_T, schedule.timesteps[0].expand(eval_cond.shape[0]), eval_cond)
    samples = {}
    for name, x in (("ddim_%d_steps" % schedule.num_steps, multi_step), ("consistency_1_step", one_step)):
        feats = evaluator.features(x)
        samples[name] = {"fd": per_class_fd(feats, eval_cond, real), "diversity": per_class_diversity(feats, eval_cond),
                         "reward": float(reward(x, eval_cond).mean())}
    samples["real_data"] = {"diversity": per_class_diversity(evaluator.features(images), labels),
                            "reward": float(reward(images, labels).mean())}
    by_class = lambda x: x.view(digits.NUM_CLASSES, per_class, *x.shape[1:])[:, :8]
    grid = torch.cat([by_class(multi_step), by_class(one_step)], 1)
    return {"x0_estimate_by_noise_level": by_noise, "samples": samples}, grid.flatten(0, 1)


def save_fp16(module: nn.Module, path: Path) -> None:
    save_file({k: v.detach().half().contiguous() for k, v in module.state_dict().items()}, str(path))


STAGES = ("reward", "evaluator", "base", "consistency")


def smoothed_bce(logit: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy against targets smoothed to 0.05 / 0.95: keeps the reward's logits in a few units
    (log p(bold) of a clearly thin digit about -3, not -15), so the reward scale is graded, not saturated."""
    return F.binary_cross_entropy_with_logits(logit, 0.05 + 0.9 * target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(digits.WEIGHTS_DIR), help="output folder (default: the shipped weights)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated networks to train (default all); the others are loaded from --out. "
                             "Each stage has its own seed, so training one alone gives what a full run gives. "
                             "'none' redoes only the measurements")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-steps", type=int, default=3000)
    parser.add_argument("--base-batch", type=int, default=64)
    parser.add_argument("--base-lr", type=float, default=1e-3)
    parser.add_argument("--cm-steps", type=int, default=2000)
    parser.add_argument("--cm-batch", type=int, default=64)
    parser.add_argument("--cm-lr", type=float, default=2e-4)
    parser.add_argument("--cm-grid-step", type=int, default=50,
                        help="teacher ODE step; 50 puts the grid on the 20-step DDIM timesteps 1, 51, ..., 951")
    parser.add_argument("--cm-guidance", type=float, default=1.0, help="teacher guidance baked into the CM")
    parser.add_argument("--classifier-steps", type=int, default=1500)
    parser.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the multi-step comparison")
    parser.add_argument("--measure-samples", type=int, default=200,
                        help="noised real digits per noise level in the measurements (samples: a quarter per class)")
    args = parser.parse_args(argv)
    stages = [] if args.stages == "none" else args.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"--stages: unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "pretrain_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() and len(stages) < len(STAGES) else {}
    report.update({"args": vars(args), "torch": torch.__version__})
    start = time.time()
    images, labels = digits.load_data()
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))
    train_idx, val_idx = perm[:1500], perm[1500:]
    schedule = DDIMSchedule.build(digits.SCHEDULER_CONFIG, args.sample_steps)

    def log(stage: str, step: int, loss: float) -> None:
        if step % 250 == 0:
            print(f"[{time.time() - start:6.0f}s] {stage} step {step} loss {loss:.4f}", flush=True)

    def stage(name: str, file: str, build, train) -> nn.Module:
        """Train a network from its own seed, or load it; later stages always see the shipped float16 weights."""
        if name in stages:
            stage_start = time.time()
            seed = args.seed + 1 + STAGES.index(name)
            torch.manual_seed(seed)
            module, record = train(build(), seed)
            report[name] = {**record, "wall_s": round(time.time() - stage_start, 1)}
            print(f"{name}: {({k: v for k, v in report[name].items() if k != 'loss_every_100'})}", flush=True)
            save_fp16(module, out / file)
        return digits.load_weights(build(), out / file)

    bold = digits.boldness_labels(images, labels)
    classifier = stage("reward", "reward.safetensors", digits.BoldnessClassifier, lambda m, seed: (m, train_classifier(
        m, images[train_idx], bold[train_idx], (images[val_idx], bold[val_idx]), args.classifier_steps, seed,
        smoothed_bce, lambda logit: (logit > 0).float())))
    evaluator = stage("evaluator", "evaluator.safetensors", digits.Evaluator, lambda m, seed: (m, train_classifier(
        m, images[train_idx], labels[train_idx], (images[val_idx], labels[val_idx]), args.classifier_steps, seed,
        F.cross_entropy, lambda logits: logits.argmax(-1))))

    def train_base_stage(unet, seed):
        ema, losses = train_base(unet, images, labels, schedule, args.base_steps, args.base_batch, args.base_lr,
                                 seed, log)
        return ema, {"loss_every_100": every_100(losses)}
    base = stage("base", "base_unet.safetensors", digits.build_unet, train_base_stage)

    def train_consistency_stage(unet, seed):
        unet.load_state_dict(base.state_dict())   # initialised from the teacher
        cm = ConsistencyModel(unet.requires_grad_(True).train(), digits.unet_eps, schedule.alphas_cumprod)
        teacher = lambda x, t, c: guided_eps(lambda *a: digits.unet_eps(base, *a), x, t, c,
                                             torch.full_like(c, digits.NULL_CLASS), args.cm_guidance).combined()
        losses = distill(teacher, cm, images, labels, schedule.alphas_cumprod, args.cm_steps, args.cm_batch,
                         args.cm_lr, torch.Generator().manual_seed(seed), grid_step=args.cm_grid_step,
                         log=lambda step, loss: log("consistency", step, loss))
        return unet, {"loss_every_100": every_100(losses)}
    cm_net = stage("consistency", "consistency_unet.safetensors", digits.build_unet, train_consistency_stage)
    cm = ConsistencyModel(cm_net, digits.unet_eps, schedule.alphas_cumprod)

    report["measurements"], grid = measure(base, cm, classifier, evaluator, images, labels, schedule,
                                           args.cm_guidance, args.seed + 1 + len(STAGES), args.measure_samples)
    save_grid(grid, out / "pretrain_samples.png", nrow=16)
    report_path.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["measurements"], indent=1))
    print(f"wrote {out} in {time.time() - start:.0f} s")


def every_100(losses: list[float]) -> list[float]:
    return [sum(losses[i:i + 100]) / len(losses[i:i + 100]) for i in range(0, len(losses), 100)]


if __name__ == "__main__":
    main()
