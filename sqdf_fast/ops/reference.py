"""Torch reference of every SQDF op: the oracle for tests and the `torch` backend.

Works in any floating dtype (float64 for tests); the step's per-sample coefficients are computed in float64 whatever
the dtype (`ddim_coefficients`), then the maths runs in the inputs' dtype. The `torch` backend (the op modules) calls
these functions on inputs upcast to the compute dtype (float32 for 16-bit inputs) and rounds the results back, as
the fused backends do. Per-sample schedule values are (B,) tensors or Python floats; they are broadcast over the
non-batch dimensions, so x may have any shape (B, ...). The domain of each op and its answer at the edges are in
docs/ops.md §5; outside the domain the reference returns NaN for the sample, as every backend does.
"""
from __future__ import annotations

import torch
from torch import Tensor


def per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    """A (B,) tensor or a float as a tensor broadcastable against `like` (B, ...), in like's dtype."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.reshape(value.shape + (1,) * (like.dim() - value.dim()))


def ddim_coefficients(alpha_t: Tensor | float, alpha_prev: Tensor | float,
                      eta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The step's per-sample coefficients (c_x, c_eps, sigma, ratio), float64 whatever the inputs' dtype (every
    backend computes them so), with x_prev = c_x x + c_eps eps + sigma noise and ratio = c_eps / sigma.

    With a = alpha_t, a' = alpha_prev, in forms free of cancellation (the fused kernels compute the same sequence):

        r       = (a' - a) / ((1 - a) a')                     in (0, 1]
        sigma   = eta sqrt((1 - a') r)                        = eta sqrt((1 - a') / (1 - a) (1 - a / a'))
        v       = (1 - a') ((1 - eta^2) + eta^2 a (1 - a') / ((1 - a) a'))      = 1 - a' - sigma^2
        c_x     = sqrt(a') / sqrt(a)
        c_eps   = -((a' - a) / a + sigma^2) / (sqrt(v) + c_x sqrt(1 - a))  = sqrt(1 - a' - sigma^2) - c_x sqrt(1 - a)

    Domain 0 < a <= a' <= 1 with v >= 0 (always so for eta <= 1). At a = a' the step is the identity: c_x = 1,
    c_eps = sigma = ratio = 0 (the limit a' -> a; the KL (c_eps / sigma)^2 mean (eps - eps_ref)^2 -> 0). Outside the
    domain all four are NaN; ratio is NaN too where sigma = 0 at a < a' (a' = 1 or eta = 0: a deterministic step,
    whose KL to another deterministic step is not finite). docs/ops.md §5.
    """
    device = next((v.device for v in (alpha_t, alpha_prev) if isinstance(v, Tensor)), None)
    a, ap = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64, device=device)
                                      for v in (alpha_t, alpha_prev)))
    step = (a > 0) & (a < ap) & (ap <= 1)          # a proper step
    same = (a > 0) & (a == ap) & (ap <= 1)         # the identity
    a, ap = torch.where(step, a, 0.25), torch.where(step, ap, 0.5)  # stand-ins elsewhere: no branch divides by 0
    one_a, one_ap, delta, eta2 = 1 - a, 1 - ap, ap - a, eta * eta
    ratio_r = delta / (one_a * ap)
    sigma_sq = eta2 * one_ap * ratio_r
    v = one_ap * ((1 - eta2) + eta2 * (a * one_ap / (one_a * ap)))
    step = step & (v >= 0)
    c_x = ap.sqrt() / a.sqrt()
    c_eps = -(delta / a + sigma_sq) / (v.clamp(min=0).sqrt() + c_x * one_a.sqrt())
    sigma = eta * (one_ap * ratio_r).sqrt()
    ratio = torch.where(sigma > 0, c_eps / torch.where(sigma > 0, sigma, 1.0), float("nan"))
    nan = torch.full_like(a, float("nan"))
    return tuple(torch.where(step, value, torch.where(same, identity, nan))
                 for value, identity in ((c_x, 1.0), (c_eps, 0.0), (sigma, 0.0), (ratio, 0.0)))


def ddim_sigma(alpha_t: Tensor | float, alpha_prev: Tensor | float, eta: float) -> Tensor:
    """sigma_j = eta * sqrt((1 - a') / (1 - a) * (1 - a / a')), a, a' the cumulative alphas at t_j and t_{j+1}: 0 at
    a = a', NaN outside 0 < a <= a' <= 1 (`ddim_coefficients`); computed in float64, returned in alpha_t's dtype
    (float64 for floats)."""
    dtype = next((v.dtype for v in (alpha_t, alpha_prev) if isinstance(v, Tensor) and v.is_floating_point()),
                 torch.float64)
    return ddim_coefficients(alpha_t, alpha_prev, eta)[2].to(dtype)


def tweedie_x0(x: Tensor, eps: Tensor, alpha_t: Tensor | float) -> Tensor:
    """Posterior mean E[x0 | x_t] for an epsilon-prediction model: (x - sqrt(1 - a) eps) / sqrt(a)."""
    a = per_sample(alpha_t, x)
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def ddim_mean(x: Tensor, eps: Tensor, alpha_t: Tensor | float, alpha_prev: Tensor | float,
              sigma: Tensor | float) -> Tensor:
    """mu = sqrt(a') x0_hat + sqrt(1 - a' - sigma^2) eps: the DDIM step without its noise."""
    a_prev = per_sample(alpha_prev, x)
    s = per_sample(sigma, x)
    return a_prev.sqrt() * tweedie_x0(x, eps, alpha_t) + (1 - a_prev - s * s).sqrt() * eps


def policy_step(x: Tensor, eps: Tensor, alpha_t: Tensor | float, alpha_prev: Tensor | float,
                eta: float, noise: Tensor, eps_ref: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Reparameterised DDIM policy step x_prev = mu(eps) + sigma * noise, and the method's KL to the reference.

    mu(eps) = c_x x + c_eps eps (= `ddim_mean`) with the coefficients of `ddim_coefficients` (float64, then rounded
    to x's dtype, in which the rest runs). kl (B,) = mean over non-batch dims of (mu(eps) - mu(eps_ref))^2 / sigma^2
    = (c_eps / sigma)^2 mean (eps - eps_ref)^2, 0 for samples with no elements. The true Gaussian KL between
    N(mu, sigma^2 I) and N(mu_ref, sigma^2 I) is sum_d (mu - mu_ref)^2 / (2 sigma^2), so kl = (2 / d) * KL_true
    with d the number of non-batch elements (docs/method.md §4.2). Edges and the domain: `ddim_coefficients`.
    """
    c_x, c_eps, sigma, ratio = ddim_coefficients(alpha_t, alpha_prev, eta)
    x_prev = per_sample(c_x, x) * x + per_sample(c_eps, x) * eps + per_sample(sigma, x) * noise
    if eps_ref is None:
        return x_prev, None
    batch = x.shape[0]
    mean_sq = ((eps - eps_ref).square().reshape(batch, -1).mean(1) if x[0].numel() > 0
               else x.new_zeros(batch))
    # the per-sample product in float64, as the fused kernels: the scale alone may overflow where the KL does not
    return x_prev, (ratio.square().reshape(-1) * mean_sq.double()).to(x.dtype)


def sqdf_loss(reward: Tensor, kl: Tensor, k: Tensor, gamma: float, alpha: float,
              weight: Tensor | None = None) -> Tensor:
    """mean(weight * (-gamma^k * reward + alpha * kl)): the discount applies to the reward term only. k >= 0 (steps
    left); a negative k makes its discount NaN (on every backend: docs/ops.md §5)."""
    k = k.to(reward.dtype)
    discount = torch.where(k >= 0, torch.pow(torch.as_tensor(gamma, dtype=reward.dtype, device=reward.device), k),
                           float("nan"))
    per_sample_loss = -discount * reward + alpha * kl
    if weight is not None:
        per_sample_loss = weight * per_sample_loss
    return per_sample_loss.mean()


def guidance(eps_cond: Tensor, eps_uncond: Tensor | None, w: float) -> Tensor:
    """Classifier-free guidance eps_u + w (eps_c - eps_u); the conditional output alone without eps_uncond."""
    return eps_cond if eps_uncond is None else eps_uncond + w * (eps_cond - eps_uncond)


def guided_policy_step(x: Tensor, eps_cond: Tensor, eps_uncond: Tensor | None, w: float,
                       alpha_t: Tensor | float, alpha_prev: Tensor | float, eta: float, noise: Tensor | None,
                       eps_ref_cond: Tensor | None = None, eps_ref_uncond: Tensor | None = None
                       ) -> tuple[Tensor, Tensor | None]:
    """`policy_step` on guided policy and reference epsilons; noise None means zero noise."""
    eps_ref = None if eps_ref_cond is None else guidance(eps_ref_cond, eps_ref_uncond, w)
    return policy_step(x, guidance(eps_cond, eps_uncond, w), alpha_t, alpha_prev, eta,
                       torch.zeros_like(x) if noise is None else noise, eps_ref)


def consistency_x0(x: Tensor, eps: Tensor, alpha_t: Tensor | float, c_skip: Tensor | float,
                   c_out: Tensor | float) -> Tensor:
    """Consistency-model boundary form c_skip x + c_out x0_hat(x, eps) (LCM); Tweedie when c_skip = 0, c_out = 1.

    Computed as p x + q eps with p = c_skip + c_out / sqrt(a), q = -c_out sqrt(1 - a) / sqrt(a) per sample in
    float64 (as the fused kernels), then rounded to x's dtype. Domain 0 < alpha_t <= 1: a sample outside it gets
    NaN (on every backend: docs/ops.md §5)."""
    a, skip, out = (torch.as_tensor(v, dtype=torch.float64, device=x.device) for v in (alpha_t, c_skip, c_out))
    a = torch.where((a > 0) & (a <= 1), a, float("nan"))
    p = skip + out / a.sqrt()
    q = -out * (1 - a).sqrt() / a.sqrt()
    return per_sample(p, x) * x + per_sample(q, x) * eps
