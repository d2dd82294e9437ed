"""The guided DDIM policy step with its KL: `policy_step`, `guided_policy_step`, `rollout_step`.

Maths: `reference.guided_policy_step` (torch) and the docstring of kernels/guided_step.py (forward and backward).
The public functions validate (`checks`) and normalise once; then the backend `dispatch` names runs: the torch
reference directly, a fused backend's launchers through `_GuidedStep` (a plain autograd.Function, the cheapest
eager path) or, inside torch.compile, through the custom ops `sqdf::guided_step{,_backward}`, which dynamo keeps
opaque (no graph break) and whose registered autograd runs the same backward as `_GuidedStep` (absent outputs:
`custom`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sqdf_fast.ops import dispatch, reference
from sqdf_fast.ops.checks import check_tensor, check_x, compute_dtype, step_alphas
from sqdf_fast.ops.custom import empty_if_none, none_if_empty


def _check_eta(eta, has_ref: bool) -> None:
    if not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"eta must be a float >= 0, got {eta!r}")
    if eta == 0 and has_ref:
        raise ValueError("eta must be > 0 when eps_ref is given: the KL divides by sigma^2, which is 0 at eta = 0")


def _check(x, tensors: dict, alpha_t, alpha_prev, eta, has_ref: bool) -> tuple[Tensor, Tensor]:
    """Checks of every step variant after check_x; returns alpha_t, alpha_prev as the launchers' (B,) tensors."""
    for name, value in tensors.items():
        if value is not None:
            check_tensor(name, value, x)
    _check_eta(eta, has_ref)
    return step_alphas(alpha_t, alpha_prev, x, eta, has_ref)


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _run(x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise, alpha_t, alpha_prev, eta, w):
    """The validated step on the backend in force: (x_prev, kl or None)."""
    backend = dispatch.backend_of(x)
    x, eps_cond, eta, w = x.contiguous(), eps_cond.contiguous(), float(eta), float(w)
    eps_uncond, eps_ref_cond, eps_ref_uncond, noise = (_contiguous(eps_uncond), _contiguous(eps_ref_cond),
                                                       _contiguous(eps_ref_uncond), _contiguous(noise))
    if backend == "torch":  # in the compute dtype, as the fused backends: 16-bit inputs upcast, results rounded back
        x_c, cond, uncond, noise_c, ref_cond, ref_uncond = (None if t is None else t.to(alpha_t.dtype) for t in (
            x, eps_cond, eps_uncond, noise, eps_ref_cond, eps_ref_uncond))
        x_prev, kl = reference.guided_policy_step(x_c, cond, uncond, w, alpha_t, alpha_prev, eta, noise_c, ref_cond,
                                                  ref_uncond)
        return x_prev.to(x.dtype), kl
    tensors = (x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise, alpha_t, alpha_prev)
    if torch.compiler.is_compiling():
        x_prev, kl = _guided_step_op(*tensors, eta, w, backend)
    else:  # the non-tensor arguments in one: autograd.Function.apply costs a few tenths of a microsecond per argument
        x_prev, kl = _GuidedStep.apply((dispatch.launchers(backend), eta, w), *tensors)
    return x_prev, (kl if eps_ref_cond is not None else None)


def guided_policy_step(x: Tensor, eps_cond: Tensor, eps_uncond: Tensor | None, guidance: float,
                       alpha_t: Tensor | float, alpha_prev: Tensor | float, eta: float, noise: Tensor | None,
                       eps_ref_cond: Tensor | None = None, eps_ref_uncond: Tensor | None = None
                       ) -> tuple[Tensor, Tensor | None]:
    """`policy_step` with classifier-free guidance folded in: eps = eps_u + w (eps_c - eps_u), the same for the
    reference, each of the (up to) four model outputs read once. eps_uncond None means the conditional output
    alone (guidance unused); noise None means zero noise. kl is float32 (float64 for float64 inputs). Backward as
    `policy_step`'s, the gradient of eps split (w, 1 - w) between eps_cond and eps_uncond (eps_ref's alike).
    Domain and edges as `policy_step` (docs/ops.md §5)."""
    check_x(x)
    alpha_t, alpha_prev = _check(x, {"eps_cond": eps_cond, "eps_uncond": eps_uncond, "noise": noise,
                                     "eps_ref_cond": eps_ref_cond, "eps_ref_uncond": eps_ref_uncond},
                                 alpha_t, alpha_prev, eta, eps_ref_cond is not None)
    if eps_cond is None:
        raise ValueError("eps_cond must be a torch.Tensor, got NoneType")
    if eps_ref_uncond is not None and eps_ref_cond is None:
        raise ValueError("eps_ref_uncond is given without eps_ref_cond")
    if eps_ref_cond is not None and (eps_uncond is None) != (eps_ref_uncond is None):
        raise ValueError("eps_uncond and eps_ref_uncond must be given together: policy and reference are guided alike")
    if not isinstance(guidance, (int, float)):
        raise ValueError(f"guidance must be a float, got {type(guidance).__name__}")
    return _run(x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise, alpha_t, alpha_prev, eta, guidance)


def policy_step(x: Tensor, eps: Tensor, alpha_t: Tensor | float, alpha_prev: Tensor | float, eta: float,
                noise: Tensor, eps_ref: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """DDIM step with stochasticity eta: x_prev = mu(eps) + sigma * noise, and kl (B,) against eps_ref.

    Forward: x_prev = c_x x + c_eps eps + sigma noise with, per sample (a = alpha_t, a' = alpha_prev),
    sigma = eta sqrt((1 - a') / (1 - a) (1 - a / a')), c_x = sqrt(a') / sqrt(a), c_eps = sqrt(1 - a' - sigma^2)
    - c_x sqrt(1 - a); kl = (c_eps / sigma)^2 mean_d (eps - eps_ref)^2. Backward: grad_x = c_x g, grad_noise =
    sigma g, grad_eps = c_eps g + h (eps - eps_ref), grad_eps_ref = -h (eps - eps_ref), h = 2 grad_kl (c_eps /
    sigma)^2 / d (kernels/guided_step.py).

    Equals diffusers `DDIMScheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample` when alpha_t,
    alpha_prev are that scheduler's cumulative alphas. kl is the method's scaling, (2 / d) times the true Gaussian
    KL (see `reference.policy_step`), in float32 (float64 for float64 inputs); None when eps_ref is None; 0 for
    samples with no elements. Differentiable in x, eps, eps_ref and noise.

    Domain (docs/ops.md §5): 0 < alpha_t <= alpha_prev <= 1 per sample and eta >= 0 with sigma^2 <= 1 - alpha_prev
    (always so at eta <= 1); with eps_ref also eta > 0 and alpha_prev < 1 where alpha_prev > alpha_t (sigma > 0).
    alpha_t = alpha_prev is the identity step (x_prev = x, kl = 0). Values outside it raise a ValueError naming the
    argument where they are readable without a host sync (Python floats, CPU tensors); on an accelerator they give
    NaN for their sample, on every backend.
    """
    check_x(x)
    check_tensor("eps", eps, x)
    check_tensor("noise", noise, x)
    alpha_t, alpha_prev = _check(x, {"eps_ref": eps_ref}, alpha_t, alpha_prev, eta, eps_ref is not None)
    return _run(x, eps, None, eps_ref, None, noise, alpha_t, alpha_prev, eta, 1.0)


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


# --- autograd: one backward for the eager Function and the compiled custom op -----------------------------------
def _backward(launch_backward, saved, eta, w, need, grad_x_prev, grad_kl):
    """Gradients of x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond and noise (`need`: which of them are
    wanted, in that order), from a launcher-contract backward (None for outputs not produced)."""
    eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, alpha_t, alpha_prev = saved
    return launch_backward(
        grad_x_prev.contiguous(), None if grad_kl is None or grad_kl.numel() == 0 else grad_kl.contiguous(),
        eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, alpha_t, alpha_prev, eta, w,
        need[0], need[1] or need[2], need[3] or need[4], need[5])


class _GuidedStep(torch.autograd.Function):
    """Eager autograd over a fused backend's launchers: `config` is (launch, eta, w), launch the backend's module."""

    @staticmethod
    def forward(ctx, config, x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise, alpha_t, alpha_prev):
        launch, eta, w = ctx.config = config
        ctx.save_for_backward(eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, alpha_t, alpha_prev)
        return launch.guided_step_forward(x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise, alpha_t,
                                          alpha_prev, eta, w)

    @staticmethod
    def backward(ctx, grad_x_prev, grad_kl):
        launch, eta, w = ctx.config
        return (None, *_backward(launch.guided_step_backward, ctx.saved_tensors, eta, w, ctx.needs_input_grad[1:],
                                 grad_x_prev, grad_kl), None, None)


@torch.library.custom_op("sqdf::guided_step", mutates_args=())
def _guided_step_op(x: Tensor, eps_cond: Tensor, eps_uncond: Optional[Tensor], eps_ref_cond: Optional[Tensor],
                    eps_ref_uncond: Optional[Tensor], noise: Optional[Tensor], alpha_t: Tensor, alpha_prev: Tensor,
                    eta: float, w: float, backend: str) -> tuple[Tensor, Tensor]:
    return dispatch.launchers(backend).guided_step_forward(x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond,
                                                           noise, alpha_t, alpha_prev, eta, w)


@_guided_step_op.register_fake
def _(x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise, alpha_t, alpha_prev, eta, w, backend):
    kl_len = x.shape[0] if eps_ref_cond is not None else 0
    return torch.empty_like(x), x.new_empty((kl_len,), dtype=compute_dtype(x.dtype))


@torch.library.custom_op("sqdf::guided_step_backward", mutates_args=())
def _guided_step_backward_op(grad_x_prev: Tensor, grad_kl: Optional[Tensor], eps_cond: Tensor,
                             eps_uncond: Optional[Tensor], eps_ref_cond: Optional[Tensor],
                             eps_ref_uncond: Optional[Tensor], alpha_t: Tensor, alpha_prev: Tensor, eta: float,
                             w: float, need_x: bool, need_eps: bool, need_ref: bool, need_noise: bool, backend: str
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = dispatch.launchers(backend).guided_step_backward(
        grad_x_prev, grad_kl, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, alpha_t, alpha_prev, eta, w,
        need_x, need_eps, need_ref, need_noise)
    return tuple(empty_if_none(g, eps_cond) for g in grads)


@_guided_step_backward_op.register_fake
def _(grad_x_prev, grad_kl, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, alpha_t, alpha_prev, eta, w,
      need_x, need_eps, need_ref, need_noise, backend):
    present = (need_x, need_eps, need_eps and eps_uncond is not None, need_ref and eps_ref_cond is not None,
               need_ref and eps_ref_uncond is not None, need_noise)
    return tuple(torch.empty_like(eps_cond) if p else eps_cond.new_empty((0,)) for p in present)


def _setup_context(ctx, inputs, output):
    x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise, alpha_t, alpha_prev, eta, w, backend = inputs
    ctx.save_for_backward(eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, alpha_t, alpha_prev)
    ctx.eta, ctx.w, ctx.backend = eta, w, backend


def _op_backward(ctx, grad_x_prev, grad_kl):
    def launch_backward(*args):
        return tuple(none_if_empty(g) for g in _guided_step_backward_op(*args, ctx.backend))
    return (*_backward(launch_backward, ctx.saved_tensors, ctx.eta, ctx.w, ctx.needs_input_grad, grad_x_prev,
                       grad_kl), None, None, None, None, None)


_guided_step_op.register_autograd(_op_backward, setup_context=_setup_context)
