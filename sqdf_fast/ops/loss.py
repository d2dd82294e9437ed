"""The discounted SQDF loss `sqdf_loss` (the module is not named after the function, which it would shadow).

Maths: `reference.sqdf_loss` (torch) and the docstring of kernels/sqdf_loss.py (forward and backward). Layout as
`guided_step`: checks once, then the torch reference, `_SqdfLoss` (eager autograd over a fused backend's launchers)
or, inside torch.compile, the opaque custom ops `sqdf::sqdf_loss{,_backward}`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sqdf_fast.ops import dispatch, reference
from sqdf_fast.ops.checks import check_steps_left, check_tensor
from sqdf_fast.ops.custom import empty_if_none, none_if_empty


def sqdf_loss(reward: Tensor, kl: Tensor, k: Tensor, gamma: float, alpha: float,
              weight: Tensor | None = None) -> Tensor:
    """Scalar mean(weight * (-gamma**k * reward + alpha * kl)); k = denoising steps left after the trained one.
    Differentiable in reward, kl and weight: grad_reward = -g weight gamma^k / B, grad_kl = g weight alpha / B,
    grad_weight = g (-gamma^k reward + alpha kl) / B.

    Domain (docs/ops.md §5): k >= 0, gamma in (0, 1], alpha >= 0. A negative (or NaN) k raises a ValueError where
    readable without a host sync (a CPU tensor); on an accelerator it makes the loss NaN, on every backend."""
    check_tensor("reward", reward)
    if reward.dim() != 1 or reward.shape[0] == 0:
        raise ValueError(f"reward must have shape (B,) with B > 0, got {tuple(reward.shape)}")
    check_tensor("kl", kl, reward)
    if not isinstance(k, Tensor) or k.shape != reward.shape:
        raise ValueError(f"k must be a tensor of shape {tuple(reward.shape)}")
    if k.device != reward.device:
        raise ValueError(f"k is on {k.device}, expected {reward.device}")
    check_steps_left(k)
    if weight is not None:
        check_tensor("weight", weight, reward)
    if not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ValueError(f"gamma must lie in (0, 1], got {gamma!r}")
    if not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    if reward.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"reward must be float32 or float64 (per-sample values are kept in full precision), "
                         f"got {reward.dtype}")
    backend = dispatch.backend_of(reward)
    reward, kl, gamma, alpha = reward.contiguous(), kl.contiguous(), float(gamma), float(alpha)
    k = k.to(reward.dtype).contiguous()
    weight = None if weight is None else weight.contiguous()
    if backend == "torch":
        return reference.sqdf_loss(reward, kl, k, gamma, alpha, weight)
    if torch.compiler.is_compiling():
        return _sqdf_loss_op(reward, kl, k, gamma, alpha, weight, backend)
    return _SqdfLoss.apply(dispatch.launchers(backend), reward, kl, k, gamma, alpha, weight)


# --- autograd: one backward for the eager Function and the compiled custom op -----------------------------------
def _backward(launch_backward, saved, gamma, alpha, need, grad):
    reward, kl, k, weight = saved
    g_reward, g_kl, g_weight = launch_backward(grad.contiguous(), reward, kl, k, gamma, alpha, weight, need[0],
                                               need[1], need[5])
    return g_reward, g_kl, None, None, None, g_weight


class _SqdfLoss(torch.autograd.Function):
    """Eager autograd over a fused backend's launchers (`launch`, the backend's module)."""

    @staticmethod
    def forward(ctx, launch, reward, kl, k, gamma, alpha, weight):
        ctx.save_for_backward(reward, kl, k, weight)
        ctx.launch, ctx.gamma, ctx.alpha = launch, gamma, alpha
        return launch.sqdf_loss_forward(reward, kl, k, gamma, alpha, weight)

    @staticmethod
    def backward(ctx, grad):
        return (None, *_backward(ctx.launch.sqdf_loss_backward, ctx.saved_tensors, ctx.gamma, ctx.alpha,
                                 ctx.needs_input_grad[1:], grad))


@torch.library.custom_op("sqdf::sqdf_loss", mutates_args=())
def _sqdf_loss_op(reward: Tensor, kl: Tensor, k: Tensor, gamma: float, alpha: float, weight: Optional[Tensor],
                  backend: str) -> Tensor:
    return dispatch.launchers(backend).sqdf_loss_forward(reward, kl, k, gamma, alpha, weight)


@_sqdf_loss_op.register_fake
def _(reward, kl, k, gamma, alpha, weight, backend):
    return reward.new_empty(())


@torch.library.custom_op("sqdf::sqdf_loss_backward", mutates_args=())
def _sqdf_loss_backward_op(grad: Tensor, reward: Tensor, kl: Tensor, k: Tensor, gamma: float, alpha: float,
                           weight: Optional[Tensor], need_reward: bool, need_kl: bool, need_weight: bool,
                           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    grads = dispatch.launchers(backend).sqdf_loss_backward(grad, reward, kl, k, gamma, alpha, weight, need_reward,
                                                           need_kl, need_weight)
    return tuple(empty_if_none(g, reward) for g in grads)


@_sqdf_loss_backward_op.register_fake
def _(grad, reward, kl, k, gamma, alpha, weight, need_reward, need_kl, need_weight, backend):
    present = (need_reward, need_kl, need_weight and weight is not None)
    return tuple(torch.empty_like(reward) if p else reward.new_empty((0,)) for p in present)


def _setup_context(ctx, inputs, output):
    reward, kl, k, gamma, alpha, weight, backend = inputs
    ctx.save_for_backward(reward, kl, k, weight)
    ctx.gamma, ctx.alpha, ctx.backend = gamma, alpha, backend


def _op_backward(ctx, grad):
    def launch_backward(*args):
        return tuple(none_if_empty(g) for g in _sqdf_loss_backward_op(*args, ctx.backend))
    return (*_backward(launch_backward, ctx.saved_tensors, ctx.gamma, ctx.alpha, ctx.needs_input_grad, grad), None)


_sqdf_loss_op.register_autograd(_op_backward, setup_context=_setup_context)
