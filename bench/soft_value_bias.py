"""How far SQDF's Q estimate r(E[x0 | x_t]) is from the soft value it stands for, on the gmm2d tasks.

    OMP_NUM_THREADS=1 python bench/soft_value_bias.py [--alpha 1] [--points 4096] [--nodes 16] [--json PATH]

The KL-regularised optimum tilts each transition by the soft value V_t(x) = alpha log E[exp(r(x0) / alpha) | x_t = x]
(docs/method.md §2.2); SQDF uses r(E[x0 | x_t = x]) instead, and on the gmm2d tasks E[x0 | x_t] is exact (the task's
consistency model is the base's posterior mean), so the only gap is the log-E-exp -> r(E) swap. The policy's
improvement step moves the transition's mean along the gradient of Q, so the ratio of gradient norms is the factor by
which SQDF over- (> 1) or under-tilts (< 1) that transition.

For each task (`gmm2d`: quadratic reward; `gmm2d-ring`: half-plane reward) at the trained states' noise levels
t_{j+1} of the 50-step DDIM schedule, x_t is drawn from the noised marginal p_t. The posterior p(x0 | x_t) is the
exact Gaussian mixture (gmm2d.posterior_mixture); E[exp(r / alpha)] over each of its components is a 2-D
Gauss-Hermite quadrature (nodes^2 points per component, placed at the component's mean plus its std times the
standard nodes, so autograd through them gives grad_x V). Posterior components have std <= 0.4: 16 nodes per axis
agree with 40 to 1e-6 on the ring, and with the closed form on the quadratic reward to rounding.
Reported per level: mean |V - r(E)|, mean (r(E) - V), mean |grad V|, the mean per-point ratio |grad r(E)| / |grad V|
(and in the JSON the same ratio for the exact posterior's expected reward E[r(x0) | x], the n = 1 limit of the
soft-Q estimate with exact samples)
and the mean cosine between the gradients, over all points and over the "split" points, whose posterior puts between 0.2
and 0.8 of its mass on the upper-half modes (mode means with y > 0; the modes at 0 and 180 degrees sit on the
boundary and count as neither). The JSON also has the same over points split on the lower-half modes, each
transition's policy variance sigma_j^2 (eta = 1: the optimal step moves the mean by sigma_j^2 grad Q / alpha), and
the targets' expected reward and mode weights.

The soft-Q estimator (`--q-samples n`, docs/method.md §3.6) is measured the same way, with the trainer's own
functions (sqdf.posterior_bridge, sqdf.log_mean_exp) and the exact posterior mean as the one-step estimate, for each
sampler:steps in --q-configs and each n in --q-samples, on --q-points of the points: Q_n is random, so each point
gets --replicates independent draws; reported are the mean bias E[Q_n] - V (negative: Jensen), the mean |Q_n - V| of
one draw, the ratio |E[grad Q_n]| / |grad V| and the cosine of E[grad Q_n] with grad V (E[grad Q_n] estimated by the
mean over the replicates, its squared norm less the trace of the mean's covariance, so that the draws' noise does
not inflate it; the cosine is that of the replicates' mean gradient, which its remaining noise lowers a little), and
the noise of one draw's gradient,
rms |grad Q_n - E[grad Q_n]| / |grad V|. Writes bench/results/soft_value_bias.json (or PATH).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sqdf_fast.info import device_name
from sqdf_fast.methods.sqdf import log_mean_exp, posterior_bridge
from sqdf_fast.schedule import DDIMSchedule
from sqdf_fast.tasks import gmm2d

RESULTS = Path(__file__).resolve().parent / "results" / "soft_value_bias.json"
TRAINED_STEPS = (0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 48)   # transitions j; the states are at t_{j+1}
SPLIT = (0.2, 0.8)
CHUNK = 512
MIN_GRAD = 1e-6   # points whose |grad V| is below this are left out of the gradient ratio and cosine


def rewards() -> dict[str, torch.nn.Module]:
    return {"gmm2d": gmm2d.QuadraticReward(gmm2d.REWARD_CENTRE, gmm2d.REWARD_LENGTH),
            "gmm2d-ring": gmm2d.HalfPlaneReward(gmm2d.HALF_PLANE_HEIGHT, gmm2d.HALF_PLANE_WIDTH)}


def gauss_hermite_2d(nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(nodes^2, 2) standard-normal quadrature points and their log weights (summing to 1)."""
    points, weights = np.polynomial.hermite_e.hermegauss(nodes)
    points, weights = torch.from_numpy(points), torch.from_numpy(weights / weights.sum())
    grid = torch.stack(torch.meshgrid(points, points, indexing="ij"), -1).reshape(-1, 2)
    return grid, (weights[:, None] * weights[None, :]).reshape(-1).log()


def soft_value(x: torch.Tensor, base: gmm2d.Mixture, a: torch.Tensor, reward, alpha: float,
               quadrature: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, gmm2d.Mixture]:
    """V(x) = alpha log sum_k rho_k(x) E_{N(m_k(x), u_k)}[exp(r / alpha)], (B,), and the posterior mixture."""
    points, log_weights = quadrature
    posterior = gmm2d.posterior_mixture(x, base, a)
    log_rho = torch.log_softmax(gmm2d.component_log_probs(x, gmm2d.noised(base, a)), dim=-1)   # no log(0)
    x0 = posterior.means[:, :, None, :] + posterior.variances.sqrt()[:, :, None, None] * points   # (B, K, Q, 2)
    r = reward(x0.reshape(-1, 2), None).reshape(x0.shape[:-1])
    log_mgf = torch.logsumexp(r / alpha + log_weights, dim=-1)                                  # (B, K)
    return alpha * torch.logsumexp(log_rho + log_mgf, dim=-1), posterior


def expected_reward(x: torch.Tensor, base: gmm2d.Mixture, a: torch.Tensor, reward,
                    quadrature: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """E[r(x0) | x_t = x] under the exact posterior (B,): what a one-sample soft-Q estimate (n = 1) aims at."""
    points, log_weights = quadrature
    posterior = gmm2d.posterior_mixture(x, base, a)
    x0 = posterior.means[:, :, None, :] + posterior.variances.sqrt()[:, :, None, None] * points
    r = reward(x0.reshape(-1, 2), None).reshape(x0.shape[:-1])
    return (posterior.weights * (r * log_weights.exp()).sum(-1)).sum(-1)


def values_and_gradients(x: torch.Tensor, a: torch.Tensor, reward, alpha: float, quadrature) -> dict:
    """V, r(E[x0|x]), their gradients in x, and the posterior mass on the upper / lower modes, per point."""
    base = gmm2d.ring_mixture()
    upper, lower = base.means[:, 1] > 0.5, base.means[:, 1] < -0.5
    out = {key: [] for key in ("v", "r_e", "grad_v", "grad_r_e", "grad_e_r", "upper", "lower")}
    for start in range(0, x.shape[0], CHUNK):
        chunk = x[start:start + CHUNK].detach().requires_grad_(True)
        level = a.expand(chunk.shape[0])
        v, posterior = soft_value(chunk, base, level, reward, alpha, quadrature)
        grad_v, = torch.autograd.grad(v.sum(), chunk)
        r_e = reward(gmm2d.posterior_mean(chunk, base, level), None)
        grad_r_e, = torch.autograd.grad(r_e.sum(), chunk)
        grad_e_r, = torch.autograd.grad(expected_reward(chunk, base, level, reward, quadrature).sum(), chunk)
        weights = posterior.weights.detach()
        for key, value in (("v", v), ("r_e", r_e), ("grad_v", grad_v), ("grad_r_e", grad_r_e), ("grad_e_r", grad_e_r),
                           ("upper", weights[:, upper].sum(-1)), ("lower", weights[:, lower].sum(-1))):
            out[key].append(value.detach())
    return {key: torch.cat(value) for key, value in out.items()}


def summarise(q: dict, mask: torch.Tensor) -> dict:
    n = int(mask.sum())
    if n == 0:
        return {"n": 0}
    v, r_e, grad_v, grad_r_e = q["v"][mask], q["r_e"][mask], q["grad_v"][mask], q["grad_r_e"][mask]
    norm_v, norm_r_e = grad_v.norm(dim=-1), grad_r_e.norm(dim=-1)
    ok = norm_v > MIN_GRAD
    ratio = norm_r_e[ok] / norm_v[ok]
    cosine = (grad_v * grad_r_e).sum(-1)[ok] / (norm_v[ok] * norm_r_e[ok]).clamp_min(1e-300)
    nan = float("nan")
    ratio_e_r = q["grad_e_r"][mask].norm(dim=-1)[ok] / norm_v[ok]
    return {"n": n, "n_grad": int(ok.sum()),
            "mean_grad_ratio_exact_expected_reward": float(ratio_e_r.mean()) if ok.any() else float("nan"),
            "mean_abs_gap": float((v - r_e).abs().mean()), "mean_gap_r_e_minus_v": float((r_e - v).mean()),
            "mean_v": float(v.mean()), "mean_r_e": float(r_e.mean()),
            "mean_grad_ratio": float(ratio.mean()) if ok.any() else nan,
            "median_grad_ratio": float(ratio.median()) if ok.any() else nan,
            "ratio_of_mean_grad_norms": float(norm_r_e.mean() / norm_v.mean()),
            "mean_grad_norm_v": float(norm_v.mean()), "mean_grad_norm_r_e": float(norm_r_e.mean()),
            "mean_cosine": float(cosine.mean()) if ok.any() else nan}


def soft_q_draws(x: torch.Tensor, t: int, alphas_cumprod: torch.Tensor, reward, alpha: float, n: int, steps: int,
                 sampler: str, replicates: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(replicates, B) draws of Q_n at the points x (B, 2) at timestep t, and their gradients in x
    (replicates, B, 2): the trainer's bridge with the exact posterior mean as its one-step estimate."""
    base = gmm2d.ring_mixture()
    draws, grads = [], []
    for start in range(0, x.shape[0], CHUNK):
        leaf = x[start:start + CHUNK].detach().repeat(replicates, 1).requires_grad_(True)   # replicate-major
        rows = leaf.repeat(n, 1)                                                           # sample-major
        noise = torch.randn((steps, *rows.shape), generator=generator, dtype=torch.float64)
        x0 = posterior_bridge(lambda y, s: gmm2d.posterior_mean(y, base, alphas_cumprod[s]), rows,
                              torch.full((rows.shape[0],), t, dtype=torch.long), alphas_cumprod, noise,
                              renoise=sampler == "renoise")
        q = log_mean_exp(reward(x0, None).reshape(n, -1), alpha)
        grad, = torch.autograd.grad(q.sum(), leaf)
        draws.append(q.detach().reshape(replicates, -1))
        grads.append(grad.reshape(replicates, -1, 2))
    return torch.cat(draws, 1), torch.cat(grads, 1)


def summarise_soft_q(draws: torch.Tensor, grads: torch.Tensor, q: dict, mask: torch.Tensor) -> dict:
    """Bias, one draw's error, and the expected gradient against V's, over the points of `mask`."""
    n = int(mask.sum())
    if n == 0:
        return {"n": 0}
    v, grad_v = q["v"][mask], q["grad_v"][mask]
    draws, grads = draws[:, mask], grads[:, mask]
    replicates, mean_grad = grads.shape[0], grads.mean(0)
    spread = (grads - mean_grad).square().sum(-1).sum(0) / (replicates - 1)   # tr Cov of one draw's gradient
    # |E g|^2 without the noise the mean of R draws keeps: |mean g|^2 - tr Cov / R (unbiased), floored at 0
    norm_q = (mean_grad.square().sum(-1) - spread / replicates).clamp_min(0).sqrt()
    norm_v = grad_v.norm(dim=-1)
    ok = norm_v > MIN_GRAD
    ratio = norm_q[ok] / norm_v[ok]
    raw = mean_grad.norm(dim=-1)   # the cosine's own norm: the direction of the replicates' mean
    cosine = (grad_v * mean_grad).sum(-1)[ok] / (norm_v[ok] * raw[ok]).clamp_min(1e-300)
    noise = spread.sqrt()[ok] / norm_v[ok]
    nan = float("nan")
    return {"n": n, "n_grad": int(ok.sum()), "mean_bias_q_minus_v": float((draws - v).mean()),
            "mean_abs_error": float((draws - v).abs().mean()),
            "mean_grad_ratio": float(ratio.mean()) if ok.any() else nan,
            "median_grad_ratio": float(ratio.median()) if ok.any() else nan,
            "mean_cosine": float(cosine.mean()) if ok.any() else nan,
            "mean_grad_noise": float(noise.mean()) if ok.any() else nan}


def reference_targets(alpha: float, importance_samples: int) -> dict:
    base, out = gmm2d.ring_mixture(), {}
    for name, reward in rewards().items():
        if name == "gmm2d":
            target = gmm2d.quadratic_target(base, reward, alpha)
            extra = {"exact": True}
        else:
            target, ess = gmm2d.importance_target(base, reward, alpha, n=importance_samples)
            extra = {"importance_samples": importance_samples, "effective_sample_fraction": round(ess, 4)}
        weights = target.mode_weights
        out[name] = {"expected_reward": round(target.expected_reward, 4),
                     "mode_weights": [round(float(w), 4) for w in weights],
                     "upper_modes_mass": round(float(weights[base.means[:, 1] > 0.5].sum()), 4),
                     "boundary_modes_mass": round(float(weights[base.means[:, 1].abs() <= 0.5].sum()), 4),
                     "lower_modes_mass": round(float(weights[base.means[:, 1] < -0.5].sum()), 4), **extra}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--points", type=int, default=4096, help="x_t samples from p_t per level")
    parser.add_argument("--nodes", type=int, default=16, help="Gauss-Hermite nodes per axis")
    parser.add_argument("--steps", type=int, nargs="+", default=list(TRAINED_STEPS),
                        help="trained transitions j of the 50-step schedule; the states are at t_{j+1}")
    parser.add_argument("--importance-samples", type=int, default=gmm2d.IMPORTANCE_SAMPLES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--q-samples", type=int, nargs="*", default=[1, 4, 16],
                        help="n of the soft-Q estimator (none: skip it)")
    parser.add_argument("--q-configs", nargs="*", default=["bridge:1", "bridge:2", "bridge:4", "bridge:8", "renoise:2"],
                        help="sampler:steps of the soft-Q estimator (sqdf.Q_SAMPLERS)")
    parser.add_argument("--q-points", type=int, default=1024, help="points per level for the soft-Q estimator")
    parser.add_argument("--replicates", type=int, default=8, help="independent draws of Q_n per point (>= 2)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    env = [f"{key}={os.environ[key]}" for key in ("PYTHONPATH", "OMP_NUM_THREADS") if key in os.environ]
    command = " ".join([*env, "python bench/soft_value_bias.py", *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()

    schedule = DDIMSchedule.build(gmm2d.SCHEDULER_CONFIG, 50, dtype=torch.float64)
    sigma_sq = schedule.sigma(1.0).square()   # transition j's policy variance (eta = 1)
    base, quadrature = gmm2d.ring_mixture(), gauss_hermite_2d(args.nodes)
    rows, q_rows = [], []
    for name, reward in rewards().items():
        for j in args.steps:
            t = int(schedule.next_timesteps[j])
            a = schedule.alpha_prev[j].reshape(1)
            generator = torch.Generator().manual_seed(args.seed + j)
            x0 = gmm2d.sample(base, args.points, generator)
            x = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
            q = values_and_gradients(x, a, reward, args.alpha, quadrature)
            split = {"all": torch.ones_like(q["v"], dtype=torch.bool),
                     "split_upper": (q["upper"] >= SPLIT[0]) & (q["upper"] <= SPLIT[1]),
                     "split_lower": (q["lower"] >= SPLIT[0]) & (q["lower"] <= SPLIT[1])}
            rows.append({"task": name, "j": j, "t": t, "alpha_cumprod": round(float(a), 6),
                         "sigma_sq": round(float(sigma_sq[j]), 6),
                         **{key: summarise(q, mask) for key, mask in split.items()}})
            sub = {key: value[:args.q_points] for key, value in q.items()}
            for config in args.q_configs:
                sampler, steps = config.split(":")
                for n in args.q_samples:
                    draws, grads = soft_q_draws(x[:args.q_points], t, schedule.alphas_cumprod, reward, args.alpha, n,
                                                int(steps), sampler, args.replicates, generator)
                    q_rows.append({"task": name, "j": j, "t": t, "sampler": sampler, "steps": int(steps), "n": n,
                                   **{key: summarise_soft_q(draws, grads, sub, mask[:args.q_points])
                                      for key, mask in split.items()}})
    targets = reference_targets(args.alpha, args.importance_samples)
    seconds = time.perf_counter() - start

    result = {"bench": "soft_value_bias", "command": command, "alpha": args.alpha, "points": args.points,
              "quadrature_nodes_per_axis": args.nodes, "sample_steps": 50, "split_band": list(SPLIT),
              "min_grad_norm_for_ratio": MIN_GRAD, "rows": rows,
              "soft_q": {"points": args.q_points, "replicates": args.replicates, "rows": q_rows},
              "targets": targets, "seconds": round(seconds, 1),
              "torch": torch.__version__, "device": device_name(torch.device("cpu")),
              "threads": torch.get_num_threads(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")

    print(f"alpha {args.alpha:g}, {args.points} points per level from p_t; split = posterior mass on the upper "
          f"modes in [{SPLIT[0]}, {SPLIT[1]}]; |gV| = mean |grad V|; ratio = mean |grad r(E)| / |grad V|")
    header = (f"{'task':11s}{'t':>5s}{'a_t':>8s} | {'|V-rE|':>7s}{'rE-V':>7s}{'|gV|':>7s}{'ratio':>7s}{'cos':>7s} | "
              f"{'n':>5s}{'|V-rE|':>7s}{'rE-V':>7s}{'ratio':>7s}{'cos':>7s}")
    print(f"{'':24s} | {'all points':^35s} | {'split points':^33s}")
    print(header)
    for row in rows:
        every, part = row["all"], row["split_upper"]
        line = (f"{row['task']:11s}{row['t']:5d}{row['alpha_cumprod']:8.4f} | {every['mean_abs_gap']:7.3f}"
                f"{every['mean_gap_r_e_minus_v']:7.3f}{every['mean_grad_norm_v']:7.3f}{every['mean_grad_ratio']:7.2f}"
                f"{every['mean_cosine']:7.3f} | "
                f"{part['n']:5d}")
        if part["n"]:
            line += (f"{part['mean_abs_gap']:7.3f}{part['mean_gap_r_e_minus_v']:7.3f}{part['mean_grad_ratio']:7.2f}"
                     f"{part['mean_cosine']:7.3f}")
        print(line)
    print_soft_q(q_rows)
    for name, target in targets.items():
        print(f"p* of {name} (alpha {args.alpha:g}): E[r] {target['expected_reward']:.3f}, mode weights "
              f"{' '.join(f'{w:.3f}' for w in target['mode_weights'])} (upper {target['upper_modes_mass']:.3f}, "
              f"boundary {target['boundary_modes_mass']:.3f}, lower {target['lower_modes_mass']:.3f})")
    print(f"{seconds:.1f} s; written to {args.json}")
    return result


def print_soft_q(q_rows: list[dict]) -> None:
    """Per task, sampler:steps and n: mean |E grad Q_n| / |grad V| per level on the split points and on all points,
    the lowest cosine over the levels, and the bias E[Q_n] - V averaged over all points and levels."""
    if not q_rows:
        return
    levels = sorted({row["t"] for row in q_rows}, reverse=True)
    keys = sorted({(row["task"], row["sampler"], row["steps"], row["n"]) for row in q_rows})
    for part in ("split_upper", "all"):
        print(f"soft-Q estimator, {'split' if part == 'split_upper' else 'all'} points: mean |E[grad Q_n]| / "
              "|grad V| per t; min cos over t; bias = mean E[Q_n] - V over all points and levels")
        print(f"{'task':11s}{'sampler':>8s}{'m':>3s}{'n':>4s} |" + "".join(f"{t:>6d}" for t in levels)
              + f" |{'cos':>6s}{'bias':>8s}")
        for key in keys:
            rows = {row["t"]: row for row in q_rows if (row["task"], row["sampler"], row["steps"], row["n"]) == key}
            ratios = "".join(f"{rows[t][part].get('mean_grad_ratio', float('nan')):6.2f}" for t in levels)
            cosine = np.nanmin([rows[t][part].get("mean_cosine", float("nan")) for t in levels])
            bias = np.mean([rows[t]["all"]["mean_bias_q_minus_v"] for t in levels])
            print(f"{key[0]:11s}{key[1]:>8s}{key[2]:3d}{key[3]:4d} |{ratios} |{cosine:6.3f}{bias:8.4f}")


if __name__ == "__main__":
    main()
