"""Torch reference of every SQDF op: the oracle for tests and the `torch` backend.

Works in any floating dtype (float64 for tests). Per-sample schedule values are (B,) tensors or Python floats;
they are broadcast over the non-batch dimensions, so x may have any shape (B, ...).
"""
from __future__ import annotations

import torch
from torch import Tensor


def per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    """A (B,) tensor or a float as a tensor broadcastable against `like` (B, ...), in like's dtype."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.reshape(value.shape + (1,) * (like.dim() - value.dim()))


def ddim_sigma(alpha_t: Tensor | float, alpha_prev: Tensor | float, eta: Tensor | float) -> Tensor:
    """sigma_j = eta * sqrt((1 - a') / (1 - a) * (1 - a / a')), a, a' the cumulative alphas at t_j and t_{j+1}."""
    alpha_t = torch.as_tensor(alpha_t)
    alpha_prev = torch.as_tensor(alpha_prev, dtype=alpha_t.dtype, device=alpha_t.device)
    return eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).sqrt()


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
                eta: Tensor | float, noise: Tensor, eps_ref: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Reparameterised DDIM policy step x_prev = mu(eps) + sigma * noise, and the method's KL to the reference.

    kl (B,) = mean over non-batch dims of (mu(eps) - mu(eps_ref))^2 / sigma^2. The true Gaussian KL between
    N(mu, sigma^2 I) and N(mu_ref, sigma^2 I) is sum_d (mu - mu_ref)^2 / (2 sigma^2), so kl = (2 / d) * KL_true
    with d the number of non-batch elements (docs/method.md §4.2).
    """
    alpha_t = torch.as_tensor(alpha_t, dtype=x.dtype, device=x.device)
    alpha_prev = torch.as_tensor(alpha_prev, dtype=x.dtype, device=x.device)
    sigma = ddim_sigma(alpha_t, alpha_prev, eta)
    mu = ddim_mean(x, eps, alpha_t, alpha_prev, sigma)
    x_prev = mu + per_sample(sigma, x) * noise
    if eps_ref is None:
        return x_prev, None
    mu_ref = ddim_mean(x, eps_ref, alpha_t, alpha_prev, sigma)
    kl = (mu - mu_ref).square().reshape(x.shape[0], -1).mean(1) / torch.broadcast_to(sigma, (x.shape[0],)).square()
    return x_prev, kl


def sqdf_loss(reward: Tensor, kl: Tensor, k: Tensor, gamma: float, alpha: float,
              weight: Tensor | None = None) -> Tensor:
    """mean(weight * (-gamma^k * reward + alpha * kl)): the discount applies to the reward term only."""
    discount = torch.pow(torch.as_tensor(gamma, dtype=reward.dtype, device=reward.device), k.to(reward.dtype))
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
    """Consistency-model boundary form c_skip x + c_out x0_hat(x, eps) (LCM); Tweedie when c_skip = 0, c_out = 1."""
    return per_sample(c_skip, x) * x + per_sample(c_out, x) * tweedie_x0(x, eps, alpha_t)
