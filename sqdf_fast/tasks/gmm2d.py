"""2-D tasks whose answer is known: a ring of Gaussians as the base model, and the exact KL-tilted target.

Base distribution p0: K = 8 isotropic Gaussians N(mu_k, s^2 I), equal weights, means on a circle of radius 3,
s = 0.4 (neighbouring modes 5.7 s apart). Everything about it is closed form (the functions below take the mixture
as an argument). Noising x_t = sqrt(a) x0 + sqrt(1 - a) z (a = alphas_cumprod[t]) gives again a mixture:

    p_t(x) = sum_k w_k N(x; sqrt(a) mu_k, v_k I),      v_k = a s_k^2 + 1 - a
    score    grad log p_t(x) = sum_k rho_k(x) (sqrt(a) mu_k - x) / v_k,   rho_k = responsibilities (logsumexp)
    E[x0 | x_t = x] = sum_k rho_k(x) (mu_k + sqrt(a) s_k^2 / v_k (x - sqrt(a) mu_k))
    eps_exact(x) = (x - sqrt(a) E[x0 | x_t = x]) / sqrt(1 - a)      (= -sqrt(1 - a) score)

The base denoiser is eps_exact plus a small MLP residual whose last layer starts at zero, so the base model *is* the
closed form; the policy LoRA sits on the MLP's Linear layers. The consistency model is the exact posterior mean
E[x0 | x_t] of the base (what a perfect consistency / Tweedie estimator gives); its timestep is clamped to [0, 999].

Target. SQDF's KL term is the per-dimension KL_code = (2/d) KL_true and d = 2 here, so the KL-regularised optimum is
p*(x) = p0(x) exp(r(x) / alpha) / Z with alpha = cfg.target_alpha, by default cfg.alpha (> 0).
- `gmm2d`: r(x) = -|x - c|^2 / (2 l^2) with c = mu_0 = (3, 0), l = 1.8. Then p* is again a Gaussian mixture
  (`tilted_mixture`): with L^2 = l^2 alpha, component k becomes N(m_k, u_k I), u_k = s_k^2 L^2 / (s_k^2 + L^2),
  m_k = (L^2 mu_k + s_k^2 c) / (s_k^2 + L^2), and its weight is proportional to
  w_k (L^2 / (s_k^2 + L^2)) exp(-|mu_k - c|^2 / (2 (s_k^2 + L^2))), whose sum is Z. At alpha = 1 the mode weights
  are 0.48, 0.22, 0.22, 0.034, 0.034 and < 0.006 for the other three; maximising the reward alone puts every
  sample on c, inside one mode.
- `gmm2d-ring`: a bounded, non-quadratic reward r(x) = h sigmoid((x . e_y) / w), h = 2.5, w = 0.3, favouring the
  upper half-plane; its boundary cuts the modes at 0 and 180 degrees in half, so p*'s components are not Gaussian.
  The target is self-normalised importance sampling from p0 (2^20 samples, seed 0; weights exp(r / alpha) lie in
  [1, e^(h/alpha)]): at alpha = 1 the effective sample size is 0.58 of the samples (0.41 at alpha = 0.3); mode
  weights 0.25 (3 upper modes), 0.09 (2 cut modes), 0.02 (3 lower modes).

Metrics against p*: `dist_to_target` is the energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| to 4096 fixed target
samples (U-statistics, so it is 0 in expectation for samples of p*, and can be slightly negative), the mode weight
error is the total-variation distance between the empirical and the target mode weights (a sample belongs to the
base component of highest responsibility), and `target_reward` is E_{p*}[r] for reference.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import DDIMScheduler
from torch import Tensor, nn

from sqdf_fast.metrics import energy_distance
from sqdf_fast.tasks import Task

NUM_MODES, RING_RADIUS, MODE_STD = 8, 3.0, 0.4
REWARD_CENTRE, REWARD_LENGTH = (RING_RADIUS, 0.0), 1.8            # gmm2d
HALF_PLANE_HEIGHT, HALF_PLANE_WIDTH = 2.5, 0.3                     # gmm2d-ring
TARGET_SAMPLES, IMPORTANCE_SAMPLES, REFERENCE_SAMPLES = 4096, 2**20, 4096
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}
LORA_TARGETS = ["hidden1", "hidden2", "output"]
RESIDUAL_SEED, TIME_FEATURES = 1234, 16
# `python -m sqdf_fast.train --task gmm2d` trains for about 9 s on a 2-core CPU and ends near the sampling floor.
# 50 DDIM steps: the base's samples are within 0.001 of p0 in energy distance (20 steps: 0.002, 10: 0.008), below
# the evaluation's own noise (about 0.002 at 1024 samples). gamma = 1: p* is the optimum of the undiscounted
# objective; at gamma = 0.9 the early, mode-choosing steps barely see the reward and the samples stay near p0.
CONFIG_DEFAULTS = {"sample_steps": 50, "alpha": 1.0, "gamma": 1.0, "steps": 300, "batch_size": 128,
                   "rollout_batch": 128, "buffer_size": 512, "lr": 3e-3, "lora_rank": 4, "lora_alpha": 4.0,
                   "eval_per_class": 1024, "log_every": 25, "checkpoint_every": 150}
# DRaFT+KL sums the KL over all T transitions: the authors' ratio to SQDF's alpha (0.035 against 2.0); its samples
# are still measured against the task's p* at alpha 1
METHOD_DEFAULTS = {"draft-kl": {"alpha": 0.0175, "target_alpha": 1.0}}


class Mixture(NamedTuple):
    """sum_k weights_k N(means_k, variances_k I) in 2-D; weights (K,) or (B, K), means (K, 2) or (B, K, 2),
    variances (K,) or (B, K)."""
    weights: Tensor
    means: Tensor
    variances: Tensor


# ---- closed forms --------------------------------------------------------------------------------------------
def ring_mixture(dtype: torch.dtype = torch.float64) -> Mixture:
    angles = torch.arange(NUM_MODES, dtype=dtype) * (2 * math.pi / NUM_MODES)
    means = RING_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)
    return Mixture(torch.full((NUM_MODES,), 1 / NUM_MODES, dtype=dtype), means,
                   torch.full((NUM_MODES,), MODE_STD**2, dtype=dtype))


def noised(mixture: Mixture, a: Tensor) -> Mixture:
    """The law of x_t = sqrt(a) x0 + sqrt(1 - a) z, x0 ~ mixture, for per-sample a (B,)."""
    a = a[:, None]
    return Mixture(mixture.weights, a.sqrt()[..., None] * mixture.means, a * mixture.variances + 1 - a)


def component_log_probs(x: Tensor, mixture: Mixture) -> Tensor:
    """(B, K): log w_k + log N(x; means_k, variances_k I)."""
    squared = (x[:, None, :] - mixture.means).square().sum(-1)
    return mixture.weights.log() - squared / (2 * mixture.variances) - torch.log(2 * math.pi * mixture.variances)


def log_prob(x: Tensor, mixture: Mixture) -> Tensor:
    return torch.logsumexp(component_log_probs(x, mixture), dim=-1)


def marginal_log_prob(x: Tensor, mixture: Mixture, a: Tensor) -> Tensor:
    return log_prob(x, noised(mixture, a))


def marginal_score(x: Tensor, mixture: Mixture, a: Tensor) -> Tensor:
    noisy = noised(mixture, a)
    responsibilities = torch.softmax(component_log_probs(x, noisy), dim=-1)
    return (responsibilities[..., None] * (noisy.means - x[:, None, :]) / noisy.variances[..., None]).sum(1)


def posterior_mixture(x: Tensor, mixture: Mixture, a: Tensor) -> Mixture:
    """p(x0 | x_t = x), a mixture per point (weights (B, K), means (B, K, 2), variances (B, K)): component k has
    the responsibility of x as its weight, mean mu_k + sqrt(a) s_k^2 / v_k (x - sqrt(a) mu_k), variance
    s_k^2 (1 - a) / v_k. Differentiable in x."""
    noisy = noised(mixture, a)
    responsibilities = torch.softmax(component_log_probs(x, noisy), dim=-1)
    gain = (a.sqrt()[:, None] * mixture.variances / noisy.variances)[..., None]
    means = mixture.means + gain * (x[:, None, :] - noisy.means)
    return Mixture(responsibilities, means, mixture.variances * (1 - a)[:, None] / noisy.variances)


def posterior_mean(x: Tensor, mixture: Mixture, a: Tensor) -> Tensor:
    """E[x0 | x_t = x]: the per-component Gaussian posterior means, weighted by the responsibilities at x."""
    posterior = posterior_mixture(x, mixture, a)
    return (posterior.weights[..., None] * posterior.means).sum(1)


def eps_exact(x: Tensor, mixture: Mixture, a: Tensor) -> Tensor:
    return (x - a.sqrt()[:, None] * posterior_mean(x, mixture, a)) / (1 - a).sqrt()[:, None]


def sample(mixture: Mixture, n: int, generator: torch.Generator) -> Tensor:
    k = torch.multinomial(mixture.weights, n, replacement=True, generator=generator)
    noise = torch.randn((n, 2), generator=generator, dtype=mixture.means.dtype)
    return mixture.means[k] + mixture.variances[k].sqrt()[:, None] * noise


def tilted_mixture(mixture: Mixture, c: Tensor, length: float, alpha: float) -> tuple[Mixture, float]:
    """p0 exp(r / alpha) / Z for r(x) = -|x - c|^2 / (2 length^2), exactly: (the mixture, log Z)."""
    tilt_var = length**2 * alpha
    total_var = mixture.variances + tilt_var
    log_mass = (mixture.weights.log() + torch.log(tilt_var / total_var)
                - (mixture.means - c).square().sum(-1) / (2 * total_var))
    log_z = torch.logsumexp(log_mass, 0)
    means = (tilt_var * mixture.means + mixture.variances[:, None] * c) / total_var[:, None]
    return Mixture((log_mass - log_z).exp(), means, mixture.variances * tilt_var / total_var), float(log_z)


# ---- rewards -------------------------------------------------------------------------------------------------
class QuadraticReward(nn.Module):
    """r(x) = -|x - c|^2 / (2 l^2)."""

    def __init__(self, centre: tuple[float, float], length: float):
        super().__init__()
        self.register_buffer("centre", torch.tensor(centre, dtype=torch.float32))
        self.length = length

    def forward(self, images: Tensor, cond: Tensor) -> Tensor:
        return -(images - self.centre.to(images.dtype)).square().sum(-1) / (2 * self.length**2)


class HalfPlaneReward(nn.Module):
    """r(x) = h sigmoid(x_2 / w): bounded in (0, h), smooth, high on the upper half-plane."""

    def __init__(self, height: float, width: float):
        super().__init__()
        self.height, self.width = height, width

    def forward(self, images: Tensor, cond: Tensor) -> Tensor:
        return self.height * torch.sigmoid(images[:, 1] / self.width)


# ---- the base denoiser ---------------------------------------------------------------------------------------
def timestep_embedding(t: Tensor, dim: int = TIME_FEATURES) -> Tensor:
    frequencies = torch.exp(-math.log(1000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ExactDenoiser(nn.Module):
    """eps(x, t) = eps_exact(x, a_t) + residual(x, t); the residual's last layer is zero, so the module alone is
    exactly the closed form. The closed form runs in float64; cond is ignored (one condition)."""

    def __init__(self, mixture: Mixture, alphas_cumprod: Tensor, width: int = 128):
        super().__init__()
        for name, value in mixture._asdict().items():
            self.register_buffer(name, value.double())
        self.register_buffer("alphas_cumprod", alphas_cumprod.double())
        with torch.random.fork_rng(devices=[]):   # the frozen random features are the same in every run
            torch.manual_seed(RESIDUAL_SEED)
            self.hidden1, self.hidden2 = nn.Linear(2 + TIME_FEATURES, width), nn.Linear(width, width)
            self.output = nn.Linear(width, 2)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        self.requires_grad_(False)

    @property
    def mixture(self) -> Mixture:
        return Mixture(self.weights, self.means, self.variances)

    def alpha(self, t: Tensor) -> Tensor:
        return self.alphas_cumprod[t.clamp(0, self.alphas_cumprod.shape[0] - 1)]

    def residual(self, x: Tensor, t: Tensor) -> Tensor:
        h = nn.functional.silu(self.hidden1(torch.cat([x, timestep_embedding(t)], dim=1)))
        return self.output(nn.functional.silu(self.hidden2(h)))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        exact = eps_exact(x.double(), self.mixture, self.alpha(t)).to(x.dtype)
        return exact + self.residual(x, t)

    def posterior_mean(self, x: Tensor, t: Tensor) -> Tensor:
        """The base's exact E[x0 | x_t] (the task's consistency model; adapters play no part)."""
        return posterior_mean(x.double(), self.mixture, self.alpha(t)).to(x.dtype)


# ---- the target and the metrics ------------------------------------------------------------------------------
class Target(NamedTuple):
    """What the metrics know of p* = p0 exp(r / alpha) / Z."""
    samples: Tensor           # (TARGET_SAMPLES, 2) float64, fixed seed
    mode_weights: Tensor      # (K,) p*-probability of each base mode
    expected_reward: float    # E_{p*}[r]
    log_normaliser: float     # log Z = log E_{p0}[exp(r / alpha)]


def assign_modes(x: Tensor, base: Mixture) -> Tensor:
    return component_log_probs(x.double(), base).argmax(-1)


def quadratic_target(base: Mixture, reward: QuadraticReward, alpha: float) -> Target:
    centre = reward.centre.double().cpu()
    tilted, log_z = tilted_mixture(base, centre, reward.length, alpha)
    squared = (tilted.means - centre).square().sum(-1) + 2 * tilted.variances   # E|x - c|^2 per component
    expected_reward = -float((tilted.weights * squared).sum()) / (2 * reward.length**2)
    samples = sample(tilted, TARGET_SAMPLES, torch.Generator().manual_seed(1))
    return Target(samples, tilted.weights, expected_reward, log_z)


def importance_target(base: Mixture, reward: Callable, alpha: float,
                      n: int = IMPORTANCE_SAMPLES) -> tuple[Target, float]:
    """p* by self-normalised importance sampling from p0; also the effective sample size as a fraction of n."""
    generator = torch.Generator().manual_seed(0)
    proposals = sample(base, n, generator)
    rewards = reward(proposals, torch.zeros(n, dtype=torch.long)).double()
    log_weights = rewards / alpha
    weights = torch.softmax(log_weights, 0)
    ess = float(1 / weights.square().sum()) / n
    mode_weights = torch.zeros(base.weights.shape[0], dtype=torch.float64)
    mode_weights.index_add_(0, assign_modes(proposals, base), weights)
    picks = torch.multinomial(weights, TARGET_SAMPLES, replacement=True, generator=generator)
    log_z = float(torch.logsumexp(log_weights, 0) - math.log(n))
    return Target(proposals[picks], mode_weights, float((weights * rewards).sum()), log_z), ess


def target_metrics(samples: Tensor, target: Target, base: Mixture) -> dict[str, float]:
    samples = samples.detach().double().cpu()
    counts = torch.bincount(assign_modes(samples, base), minlength=base.weights.shape[0])
    empirical = counts.double() / samples.shape[0]
    present = target.mode_weights > 0.01   # modes the target really has
    covered = empirical[present] >= 0.5 * target.mode_weights[present]
    return {"dist_to_target": energy_distance(samples, target.samples),
            "mode_weight_error": float(0.5 * (empirical - target.mode_weights).abs().sum()),
            "mode_coverage": float(covered.double().mean()),
            "target_reward": target.expected_reward}


def plot_target_samples(samples: Tensor, target: Target, base: Mixture, reward: Callable, alpha: float,
                        title: str, path: str | Path) -> None:
    """Samples over the contours of log p*, base mode centres marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    samples = samples.detach().double().cpu()
    axis = torch.linspace(-5, 5, 201, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(-1, 2)
    with torch.no_grad():
        log_target = log_prob(grid, base) + reward(grid, torch.zeros(len(grid), dtype=torch.long)) / alpha \
            - target.log_normaliser
    metrics = target_metrics(samples, target, base)
    fig, ax = plt.subplots(figsize=(5, 5))
    top = float(log_target.max())   # six nats of log density: modes down to 0.25% of the peak stay visible
    ax.contourf(axis, axis, log_target.reshape(201, 201), levels=torch.linspace(top - 6, top, 13).tolist(),
                cmap="Blues", extend="min")
    ax.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:orange", alpha=0.5, label="samples")
    ax.scatter(base.means[:, 0], base.means[:, 1], marker="x", c="black", s=40, label="p0 modes")
    ax.set(xlim=(-5, 5), ylim=(-5, 5), aspect="equal",
           title=f"{title}\nmode coverage {metrics['mode_coverage']:.2f} | dist_to_target "
                 f"{metrics['dist_to_target']:.3g}")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the tasks -----------------------------------------------------------------------------------------------
def build_denoiser() -> ExactDenoiser:
    alphas = DDIMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod   # the sampler's own (float32) table
    return ExactDenoiser(ring_mixture(), alphas)


def target_alpha(name: str, cfg) -> float:
    """The alpha of p*: cfg.target_alpha (a comparison pins it for every method), else the run's own alpha."""
    if cfg.target_alpha is not None:
        return cfg.target_alpha
    if cfg.alpha <= 0:
        raise ValueError(f"alpha={cfg.alpha!r}: task {name} needs alpha > 0 (its target is p0 exp(r / alpha)) "
                         "or a target_alpha > 0")
    return cfg.alpha


def _make(name: str, alpha: float, reward: nn.Module, target: Target) -> Task:
    unet, base = build_denoiser(), ring_mixture()
    plot_reward = copy.deepcopy(reward)   # stays on the CPU with the plot's grid while `reward` follows the task
    reference = sample(base, REFERENCE_SAMPLES, torch.Generator().manual_seed(2)).float()
    title = f"{name}, target alpha={alpha:g}"
    return Task(
        name=name, unet=unet, eps=unet, scheduler_config=SCHEDULER_CONFIG,
        sample_shape=(2,),
        sample_conditions=lambda n, generator: torch.zeros(n, dtype=torch.long, device=generator.device),
        null_condition=lambda cond: cond, reward=reward, decode=lambda x0: x0, lora_targets=LORA_TARGETS,
        consistency=lambda x_t, t, cond: unet.posterior_mean(x_t, t),
        features=lambda images: images,
        real_features=lambda cond: {0: reference.to(cond.device)},
        eval_conditions=lambda per_class: torch.zeros(per_class, dtype=torch.long),
        target_metrics=lambda images, cond: target_metrics(images, target, base),
        plot_samples=lambda images, cond, per_class, path: plot_target_samples(
            images, target, base, plot_reward, alpha, title, path),
        frozen=[reward],
    )


def make_task(cfg) -> Task:
    """gmm2d: the quadratic reward around mode 0, exact tilted-mixture target."""
    alpha = target_alpha("gmm2d", cfg)
    reward = QuadraticReward(REWARD_CENTRE, REWARD_LENGTH)
    return _make("gmm2d", alpha, reward, quadratic_target(ring_mixture(), reward, alpha))


def make_ring_task(cfg) -> Task:
    """gmm2d-ring: the half-plane reward, importance-sampled target."""
    alpha = target_alpha("gmm2d-ring", cfg)
    reward = HalfPlaneReward(HALF_PLANE_HEIGHT, HALF_PLANE_WIDTH)
    target, _ = importance_target(ring_mixture(), reward, alpha)
    return _make("gmm2d-ring", alpha, reward, target)
