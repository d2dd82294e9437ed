"""Public SQDF ops: `policy_step`, `guided_policy_step`, `rollout_step`, `tweedie_x0`, `consistency_x0`, `sqdf_loss`.

Importable without diffusers or transformers. Inputs are validated (ValueError naming the argument) before any
maths runs, the same on every backend; then `dispatch` picks the implementation (Triton on CUDA, C++ on the CPU,
the torch reference otherwise; `SQDF_KERNELS` or `use_backend` override it). Value-range checks (cumulative
alphas in (0, 1]) run on CPU tensors and Python floats only: on an accelerator they would force a host sync, so
device-resident schedule tables are validated once when they are built (`sqdf_fast.schedule.DDIMSchedule`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from sqdf_fast.ops import dispatch
from sqdf_fast.ops.dispatch import use_backend

__all__ = ["policy_step", "guided_policy_step", "rollout_step", "tweedie_x0", "consistency_x0", "sqdf_loss",
           "use_backend", "backend_for"]


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
        if value.device.type == "cpu" and not torch.compiler.is_compiling():
            lowest, highest = (float(v) for v in torch.aminmax(value))  # one pass: this runs on every step
            if not (low_open < lowest and highest <= high):  # NaN fails too
                raise ValueError(f"{name} must lie in ({low_open}, {high}], got values in [{lowest}, {highest}]")
    elif isinstance(value, (int, float)):
        if not low_open < value <= high:
            raise ValueError(f"{name} must lie in ({low_open}, {high}], got {value}")
    else:
        raise ValueError(f"{name} must be a float or a tensor, got {type(value).__name__}")


def _check_x(x) -> None:
    _check_tensor("x", x)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")


def _check_guidance(w) -> None:
    if not isinstance(w, (int, float)):
        raise ValueError(f"guidance must be a float, got {type(w).__name__}")


def _check_eta(eta, has_ref: bool) -> None:
    if not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"eta must be a float >= 0, got {eta!r}")
    if eta == 0 and has_ref:
        raise ValueError("eta must be > 0 when eps_ref is given: the KL divides by sigma^2, which is 0 at eta = 0")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample_tensor(value: Tensor | float, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(B,) contiguous tensor of the kernels' compute dtype; a float becomes a device-side fill (no host copy)."""
    if isinstance(value, Tensor):
        return value.to(dtype).expand(batch).contiguous()
    return torch.full((batch,), float(value), dtype=dtype, device=device)


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def backend_for(device: torch.device | str) -> tuple[str, str]:
    """(backend, why) the ops would use for tensors on `device` right now."""
    return dispatch.resolve(torch.device(device))


def _check_step(x: Tensor, tensors: dict[str, Tensor | None], alpha_t, alpha_prev, eta, has_ref: bool) -> None:
    _check_x(x)
    for name, value in tensors.items():
        if value is not None:
            _check_tensor(name, value, x)
    _check_eta(eta, has_ref)
    _check_per_sample("alpha_t", alpha_t, x.shape[0], x.device, 0.0, 1.0)
    _check_per_sample("alpha_prev", alpha_prev, x.shape[0], x.device, 0.0, 1.0)


def _run_step(x, eps_cond, eps_uncond, guidance, alpha_t, alpha_prev, eta, noise, eps_ref_cond, eps_ref_uncond):
    batch, ct = x.shape[0], _compute_dtype(x)
    x_prev, kl = dispatch.ops_for(x.device).guided_step(
        x.contiguous(), eps_cond.contiguous(), _contiguous(eps_uncond), _contiguous(eps_ref_cond),
        _contiguous(eps_ref_uncond), _contiguous(noise), _per_sample_tensor(alpha_t, batch, ct, x.device),
        _per_sample_tensor(alpha_prev, batch, ct, x.device), float(eta), float(guidance))
    return x_prev, (kl if eps_ref_cond is not None else None)


def guided_policy_step(x: Tensor, eps_cond: Tensor, eps_uncond: Tensor | None, guidance: float,
                       alpha_t: Tensor | float, alpha_prev: Tensor | float, eta: float, noise: Tensor | None,
                       eps_ref_cond: Tensor | None = None, eps_ref_uncond: Tensor | None = None
                       ) -> tuple[Tensor, Tensor | None]:
    """`policy_step` with classifier-free guidance folded in: eps = eps_u + w (eps_c - eps_u), the same for the
    reference, each of the (up to) four model outputs read once. eps_uncond None means the conditional output
    alone (guidance unused); noise None means zero noise. kl is float32 (float64 for float64 inputs)."""
    _check_step(x, {"eps_cond": eps_cond, "eps_uncond": eps_uncond, "noise": noise, "eps_ref_cond": eps_ref_cond,
                    "eps_ref_uncond": eps_ref_uncond}, alpha_t, alpha_prev, eta, eps_ref_cond is not None)
    if eps_cond is None:
        raise ValueError("eps_cond must be a torch.Tensor, got NoneType")
    if eps_ref_uncond is not None and eps_ref_cond is None:
        raise ValueError("eps_ref_uncond is given without eps_ref_cond")
    if eps_ref_cond is not None and (eps_uncond is None) != (eps_ref_uncond is None):
        raise ValueError("eps_uncond and eps_ref_uncond must be given together: policy and reference are guided alike")
    _check_guidance(guidance)
    return _run_step(x, eps_cond, eps_uncond, guidance, alpha_t, alpha_prev, eta, noise, eps_ref_cond,
                     eps_ref_uncond)


def policy_step(x: Tensor, eps: Tensor, alpha_t: Tensor | float, alpha_prev: Tensor | float, eta: float,
                noise: Tensor, eps_ref: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """DDIM step with stochasticity eta: x_prev = mu(eps) + sigma * noise, and kl (B,) against eps_ref.

    Equals diffusers `DDIMScheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample` when alpha_t,
    alpha_prev are that scheduler's cumulative alphas. kl is the method's scaling, (2 / d) times the true Gaussian
    KL (see `reference.policy_step`), in float32 (float64 for float64 inputs); None when eps_ref is None.
    Differentiable in x, eps, eps_ref and noise.
    """
    _check_x(x)
    _check_tensor("eps", eps, x)
    _check_tensor("noise", noise, x)
    _check_step(x, {"eps_ref": eps_ref}, alpha_t, alpha_prev, eta, eps_ref is not None)
    return _run_step(x, eps, None, 1.0, alpha_t, alpha_prev, eta, noise, eps_ref, None)


@torch.no_grad()
def rollout_step(x: Tensor, eps_cond: Tensor, eps_uncond: Tensor | None, guidance: float,
                 alpha_t: Tensor | float, alpha_prev: Tensor | float, eta: float, noise: Tensor | None,
                 eps_ref_cond: Tensor | None = None, eps_ref_uncond: Tensor | None = None
                 ) -> tuple[Tensor, Tensor | None]:
    """The sampling step: guidance + DDIM + noise in one pass, without autograd; arguments as
    `guided_policy_step`. The second output is the true Gaussian KL of this transition in nats,
    sum_d (mu - mu_ref)^2 / (2 sigma^2), when reference outputs are given."""
    x_prev, kl = guided_policy_step(x, eps_cond, eps_uncond, guidance, alpha_t, alpha_prev, eta, noise,
                                    eps_ref_cond, eps_ref_uncond)
    return x_prev, (None if kl is None else kl * (x[0].numel() / 2))


def consistency_x0(x: Tensor, eps: Tensor, alpha_t: Tensor | float, c_skip: Tensor | float | None = None,
                   c_out: Tensor | float | None = None) -> Tensor:
    """c_skip x + c_out (x - sqrt(1 - alpha_t) eps) / sqrt(alpha_t): a consistency model's boundary form (LCM)
    around an epsilon network; plain Tweedie when c_skip, c_out are None. Differentiable in x and eps."""
    _check_x(x)
    _check_tensor("eps", eps, x)
    batch, ct = x.shape[0], _compute_dtype(x)
    _check_per_sample("alpha_t", alpha_t, batch, x.device, 0.0, 1.0)
    for name, value in (("c_skip", c_skip), ("c_out", c_out)):
        if value is not None:
            _check_per_sample(name, value, batch, x.device, -float("inf"), float("inf"))
    scalings = [None if v is None else _per_sample_tensor(v, batch, ct, x.device) for v in (c_skip, c_out)]
    return dispatch.ops_for(x.device).x0_estimate(x.contiguous(), eps.contiguous(),
                                                  _per_sample_tensor(alpha_t, batch, ct, x.device), *scalings)


def tweedie_x0(x: Tensor, eps: Tensor, alpha_t: Tensor | float) -> Tensor:
    """Posterior-mean estimate x0_hat = (x - sqrt(1 - alpha_t) eps) / sqrt(alpha_t); differentiable in x and eps."""
    return consistency_x0(x, eps, alpha_t)


def sqdf_loss(reward: Tensor, kl: Tensor, k: Tensor, gamma: float, alpha: float,
              weight: Tensor | None = None) -> Tensor:
    """Scalar mean(weight * (-gamma**k * reward + alpha * kl)); k = denoising steps left after the trained one.
    Differentiable in reward, kl and weight."""
    _check_tensor("reward", reward)
    if reward.dim() != 1 or reward.shape[0] == 0:
        raise ValueError(f"reward must have shape (B,) with B > 0, got {tuple(reward.shape)}")
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
    if reward.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"reward must be float32 or float64 (per-sample values are kept in full precision), "
                         f"got {reward.dtype}")
    return dispatch.ops_for(reward.device).sqdf_loss(reward.contiguous(), kl.contiguous(),
                                                     k.to(reward.dtype).contiguous(), float(gamma), float(alpha),
                                                     _contiguous(weight))
