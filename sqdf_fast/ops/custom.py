"""The fused backends as torch custom ops with autograd (`torch.library`).

A backend is a module of six launchers with one contract (see `kernels/__init__.py` and `sqdf_fast/ops/cpp.py`):
guided_step_forward/backward, x0_estimate_forward/backward, sqdf_loss_forward/backward. Inputs reaching them are
validated and normalised by `sqdf_fast.ops`: contiguous, per-sample values as (B,) tensors of the compute dtype
(float64 for float64 inputs, float32 otherwise). Registering them as custom ops (namespace `sqdf_<backend>`) keeps
them opaque to `torch.compile` (no graph break) and lets autograd call the fused backward kernels.

Optional outputs cannot be expressed in an op schema, so an absent output is an empty (0,) tensor here and None
at the public API.
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor


def _none_if_empty(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 and t.dim() == 1 else t


def _empty_like_missing(t: Tensor | None, like: Tensor) -> Tensor:
    return torch.empty(0, dtype=like.dtype, device=like.device) if t is None else t


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def register(backend: str, module: str) -> SimpleNamespace:
    """Custom ops `sqdf_<backend>::{guided_step, x0_estimate, sqdf_loss}` with autograd, running the launchers of
    `module`. The module is imported on the first call, not here: registration stays cheap (no triton import) and
    the op table is a plain lookup that torch.compile traces without a graph break."""
    ns = f"sqdf_{backend}"

    def launchers():
        return importlib.import_module(module)

    # --- guided DDIM step + KL -----------------------------------------------------------------------------
    @torch.library.custom_op(f"{ns}::guided_step", mutates_args=())
    def guided_step(x: Tensor, eps_cond: Tensor, eps_uncond: Optional[Tensor], eps_ref_cond: Optional[Tensor],
                    eps_ref_uncond: Optional[Tensor], noise: Optional[Tensor], alpha_t: Tensor, alpha_prev: Tensor,
                    eta: float, w: float) -> tuple[Tensor, Tensor]:
        return launchers().guided_step_forward(x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise,
                                             alpha_t, alpha_prev, eta, w)

    @guided_step.register_fake
    def _(x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise, alpha_t, alpha_prev, eta, w):
        kl_len = x.shape[0] if eps_ref_cond is not None else 0
        return torch.empty_like(x), x.new_empty((kl_len,), dtype=_compute_dtype(x))

    @torch.library.custom_op(f"{ns}::guided_step_backward", mutates_args=())
    def guided_step_backward(grad_x_prev: Tensor, grad_kl: Optional[Tensor], eps_cond: Tensor,
                             eps_uncond: Optional[Tensor], eps_ref_cond: Optional[Tensor],
                             eps_ref_uncond: Optional[Tensor], alpha_t: Tensor, alpha_prev: Tensor, eta: float,
                             w: float, need_x: bool, need_eps: bool, need_ref: bool, need_noise: bool
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        grads = launchers().guided_step_backward(grad_x_prev, grad_kl, eps_cond, eps_uncond, eps_ref_cond,
                                               eps_ref_uncond, alpha_t, alpha_prev, eta, w, need_x, need_eps,
                                               need_ref, need_noise)
        return tuple(_empty_like_missing(g, eps_cond) for g in grads)

    @guided_step_backward.register_fake
    def _(grad_x_prev, grad_kl, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, alpha_t, alpha_prev, eta, w,
          need_x, need_eps, need_ref, need_noise):
        present = (need_x, need_eps, need_eps and eps_uncond is not None, need_ref and eps_ref_cond is not None,
                   need_ref and eps_ref_uncond is not None, need_noise)
        return tuple(torch.empty_like(eps_cond) if p else eps_cond.new_empty((0,)) for p in present)

    def guided_step_setup(ctx, inputs, output):
        x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise, alpha_t, alpha_prev, eta, w = inputs
        ctx.save_for_backward(eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, alpha_t, alpha_prev)
        ctx.eta, ctx.w = eta, w

    def guided_step_grad(ctx, grad_x_prev, grad_kl):
        eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, alpha_t, alpha_prev = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = guided_step_backward(
            grad_x_prev.contiguous(), None if grad_kl is None or grad_kl.numel() == 0 else grad_kl.contiguous(),
            eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, alpha_t, alpha_prev, ctx.eta, ctx.w,
            need[0], need[1] or need[2], need[3] or need[4], need[5])
        g_x, g_eps_c, g_eps_u, g_ref_c, g_ref_u, g_noise = (_none_if_empty(g) for g in grads)
        return g_x, g_eps_c, g_eps_u, g_ref_c, g_ref_u, g_noise, None, None, None, None

    guided_step.register_autograd(guided_step_grad, setup_context=guided_step_setup)

    # --- one-step x0 estimate (Tweedie / consistency boundary form) ------------------------------------------
    @torch.library.custom_op(f"{ns}::x0_estimate", mutates_args=())
    def x0_estimate(x: Tensor, eps: Tensor, alpha_t: Tensor, c_skip: Optional[Tensor],
                    c_out: Optional[Tensor]) -> Tensor:
        return launchers().x0_estimate_forward(x, eps, alpha_t, c_skip, c_out)

    @x0_estimate.register_fake
    def _(x, eps, alpha_t, c_skip, c_out):
        return torch.empty_like(x)

    @torch.library.custom_op(f"{ns}::x0_estimate_backward", mutates_args=())
    def x0_estimate_backward(grad: Tensor, alpha_t: Tensor, c_skip: Optional[Tensor], c_out: Optional[Tensor],
                             need_x: bool, need_eps: bool) -> tuple[Tensor, Tensor]:
        grads = launchers().x0_estimate_backward(grad, alpha_t, c_skip, c_out, need_x, need_eps)
        return tuple(_empty_like_missing(g, grad) for g in grads)

    @x0_estimate_backward.register_fake
    def _(grad, alpha_t, c_skip, c_out, need_x, need_eps):
        return tuple(torch.empty_like(grad) if p else grad.new_empty((0,)) for p in (need_x, need_eps))

    def x0_estimate_setup(ctx, inputs, output):
        _, _, alpha_t, c_skip, c_out = inputs
        ctx.save_for_backward(alpha_t, c_skip, c_out)

    def x0_estimate_grad(ctx, grad):
        alpha_t, c_skip, c_out = ctx.saved_tensors
        g_x, g_eps = x0_estimate_backward(grad.contiguous(), alpha_t, c_skip, c_out, ctx.needs_input_grad[0],
                                          ctx.needs_input_grad[1])
        return _none_if_empty(g_x), _none_if_empty(g_eps), None, None, None

    x0_estimate.register_autograd(x0_estimate_grad, setup_context=x0_estimate_setup)

    # --- discounted loss -------------------------------------------------------------------------------------
    @torch.library.custom_op(f"{ns}::sqdf_loss", mutates_args=())
    def sqdf_loss(reward: Tensor, kl: Tensor, k: Tensor, gamma: float, alpha: float,
                  weight: Optional[Tensor]) -> Tensor:
        return launchers().sqdf_loss_forward(reward, kl, k, gamma, alpha, weight)

    @sqdf_loss.register_fake
    def _(reward, kl, k, gamma, alpha, weight):
        return reward.new_empty(())

    @torch.library.custom_op(f"{ns}::sqdf_loss_backward", mutates_args=())
    def sqdf_loss_backward(grad: Tensor, reward: Tensor, kl: Tensor, k: Tensor, gamma: float, alpha: float,
                           weight: Optional[Tensor], need_reward: bool, need_kl: bool,
                           need_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
        grads = launchers().sqdf_loss_backward(grad, reward, kl, k, gamma, alpha, weight, need_reward, need_kl,
                                             need_weight)
        return tuple(_empty_like_missing(g, reward) for g in grads)

    @sqdf_loss_backward.register_fake
    def _(grad, reward, kl, k, gamma, alpha, weight, need_reward, need_kl, need_weight):
        present = (need_reward, need_kl, need_weight and weight is not None)
        return tuple(torch.empty_like(reward) if p else reward.new_empty((0,)) for p in present)

    def sqdf_loss_setup(ctx, inputs, output):
        reward, kl, k, gamma, alpha, weight = inputs
        ctx.save_for_backward(reward, kl, k, weight)
        ctx.gamma, ctx.alpha = gamma, alpha

    def sqdf_loss_grad(ctx, grad):
        reward, kl, k, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_r, g_kl, g_w = sqdf_loss_backward(grad.contiguous(), reward, kl, k, ctx.gamma, ctx.alpha, weight,
                                            need[0], need[1], need[5])
        return _none_if_empty(g_r), _none_if_empty(g_kl), None, None, None, _none_if_empty(g_w)

    sqdf_loss.register_autograd(sqdf_loss_grad, setup_context=sqdf_loss_setup)

    return SimpleNamespace(guided_step=guided_step, x0_estimate=x0_estimate, sqdf_loss=sqdf_loss)
