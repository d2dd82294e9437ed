"""Public SQDF ops: `policy_step`, `tweedie_x0`, `sqdf_loss`.

Importable without diffusers or transformers. Inputs are validated (ValueError naming the argument) before any
maths runs. Value-range checks (cumulative alphas in (0, 1]) run on CPU tensors and Python floats only: on an
accelerator they would force a host sync, so device-resident schedule tables are validated once when they are
built (`sqdf_fast.schedule.DDIMSchedule`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from sqdf_fast.ops import reference

__all__ = ["policy_step", "tweedie_x0", "sqdf_loss"]


def _check_tensor(name: str, value, like: Tensor | None = None) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {value.dtype}")
    if like is not None:
        if value.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(like.shape)}")
        if value.dtype != like.dtype:
            raise ValueError(f"{name} has dtype {value.dtype}, expected {like.dtype}")
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device}, expected {like.device}")


def _check_per_sample(name: str, value, batch: int, device: torch.device, low_open: float, high: float) -> None:
    """A Python float or a (B,)/() tensor on `device`, with values in (low_open, high] where checkable."""
    if isinstance(value, Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
            raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device}, expected {device}")
        if value.device.type == "cpu" and not bool(((value > low_open) & (value <= high)).all()):
            raise ValueError(f"{name} must lie in ({low_open}, {high}]")
    elif isinstance(value, (int, float)):
        if not low_open < value <= high:
            raise ValueError(f"{name} must lie in ({low_open}, {high}], got {value}")
    else:
        raise ValueError(f"{name} must be a float or a tensor, got {type(value).__name__}")


def _check_x(x) -> None:
    _check_tensor("x", x)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")


def tweedie_x0(x: Tensor, eps: Tensor, alpha_t: Tensor | float) -> Tensor:
    """Posterior-mean estimate x0_hat = (x - sqrt(1 - alpha_t) eps) / sqrt(alpha_t); differentiable in x and eps."""
    _check_x(x)
    _check_tensor("eps", eps, x)
    _check_per_sample("alpha_t", alpha_t, x.shape[0], x.device, 0.0, 1.0)
    return reference.tweedie_x0(x, eps, alpha_t)


def policy_step(x: Tensor, eps: Tensor, alpha_t: Tensor | float, alpha_prev: Tensor | float, eta: float,
                noise: Tensor, eps_ref: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """DDIM step with stochasticity eta: x_prev = mu(eps) + sigma * noise, and kl (B,) against eps_ref.

    Equals diffusers `DDIMScheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample` when alpha_t,
    alpha_prev are that scheduler's cumulative alphas. kl is the method's scaling, (2 / d) times the true Gaussian
    KL (see `reference.policy_step`); None when eps_ref is None.
    """
    _check_x(x)
    _check_tensor("eps", eps, x)
    _check_tensor("noise", noise, x)
    if eps_ref is not None:
        _check_tensor("eps_ref", eps_ref, x)
    batch = x.shape[0]
    _check_per_sample("alpha_t", alpha_t, batch, x.device, 0.0, 1.0)
    _check_per_sample("alpha_prev", alpha_prev, batch, x.device, 0.0, 1.0)
    if not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"eta must be a float >= 0, got {eta!r}")
    if eta == 0 and eps_ref is not None:
        raise ValueError("eta must be > 0 when eps_ref is given: the KL divides by sigma^2, which is 0 at eta = 0")
    return reference.policy_step(x, eps, alpha_t, alpha_prev, eta, noise, eps_ref)


def sqdf_loss(reward: Tensor, kl: Tensor, k: Tensor, gamma: float, alpha: float,
              weight: Tensor | None = None) -> Tensor:
    """Scalar mean(weight * (-gamma**k * reward + alpha * kl)); k = denoising steps left after the trained one."""
    _check_tensor("reward", reward)
    if reward.dim() != 1:
        raise ValueError(f"reward must have shape (B,), got {tuple(reward.shape)}")
    _check_tensor("kl", kl, reward)
    if not isinstance(k, Tensor) or k.shape != reward.shape:
        raise ValueError(f"k must be a tensor of shape {tuple(reward.shape)}")
    if k.device != reward.device:
        raise ValueError(f"k is on {k.device}, expected {reward.device}")
    if weight is not None:
        _check_tensor("weight", weight, reward)
    if not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ValueError(f"gamma must lie in (0, 1], got {gamma!r}")
    if not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    return reference.sqdf_loss(reward, kl, k, gamma, alpha, weight)
