"""Discounted SQDF loss over the batch, forward and backward.

Maths, on (B,) vectors of the compute dtype (weight 1 when absent):

    loss = mean_b weight_b (-gamma^k_b reward_b + alpha kl_b)
    grad_reward = -grad weight gamma^k / B,   grad_kl = grad weight alpha / B,
    grad_weight = grad (-gamma^k reward + alpha kl) / B

gamma^k = exp2(k log2 gamma) with log2 gamma taken on the host (gamma > 0; the ops layer requires (0, 1]); k >= 0,
and a negative k gives a NaN discount, as on every backend (docs/ops.md §5).

Kernels: `_loss_forward_kernel` is a single program that walks the batch in BLOCK-wide steps into a vector
accumulator and sums it once: a fixed order, so the loss is bitwise reproducible (B is a batch size, so one
program suffices). `_loss_backward_kernel` is elementwise over cdiv(B, BLOCK) programs and reads the upstream
gradient through its pointer, so no launcher syncs with the device.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import NAN, compute_dtypes, scalar_arg

BLOCK = 1024


@triton.jit
def _discount(k_ptr, offs, mask, log2_gamma, CT: tl.constexpr):
    """gamma^k, NaN for a negative k (outside the domain: docs/ops.md §5)."""
    k = tl.load(k_ptr + offs, mask=mask, other=0.0).to(CT)
    return tl.where(k >= 0, tl.exp2(k * scalar_arg(log2_gamma, CT)), NAN)


@triton.jit
def _loss_forward_kernel(reward_ptr, kl_ptr, k_ptr, weight_ptr, loss_ptr, B, log2_gamma: tl.float64,
                         alpha: tl.float64, CT: tl.constexpr, BLOCK: tl.constexpr):
    alpha_ct = scalar_arg(alpha, CT)
    acc = tl.zeros([BLOCK], CT)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < B
        term = (-_discount(k_ptr, offs, mask, log2_gamma, CT) * tl.load(reward_ptr + offs, mask=mask, other=0.0)
                + alpha_ct * tl.load(kl_ptr + offs, mask=mask, other=0.0))
        if weight_ptr is not None:
            term *= tl.load(weight_ptr + offs, mask=mask, other=0.0)
        acc += term
    tl.store(loss_ptr, tl.sum(acc, axis=0) / B)


@triton.jit
def _loss_backward_kernel(grad_ptr, reward_ptr, kl_ptr, k_ptr, weight_ptr, grad_reward_ptr, grad_kl_ptr,
                          grad_weight_ptr, B, log2_gamma: tl.float64, alpha: tl.float64, CT: tl.constexpr,
                          BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < B
    alpha_ct = scalar_arg(alpha, CT)
    scale = tl.load(grad_ptr).to(CT) / B
    if weight_ptr is not None:
        weighted = scale * tl.load(weight_ptr + offs, mask=mask)
    else:
        weighted = scale + tl.zeros([BLOCK], CT)
    if grad_kl_ptr is not None:
        tl.store(grad_kl_ptr + offs, weighted * alpha_ct, mask=mask)
    if grad_reward_ptr is not None or grad_weight_ptr is not None:
        discount = _discount(k_ptr, offs, mask, log2_gamma, CT)
        if grad_reward_ptr is not None:
            tl.store(grad_reward_ptr + offs, -weighted * discount, mask=mask)
        if grad_weight_ptr is not None:
            term = -discount * tl.load(reward_ptr + offs, mask=mask) + alpha_ct * tl.load(kl_ptr + offs, mask=mask)
            tl.store(grad_weight_ptr + offs, scale * term, mask=mask)


def _log2_gamma(gamma: float) -> float:
    if not gamma > 0:
        raise ValueError(f"triton launcher: gamma must be > 0, got {gamma!r}")
    return math.log2(gamma)


def sqdf_loss_forward(reward: torch.Tensor, kl: torch.Tensor, k: torch.Tensor, gamma: float, alpha: float,
                      weight: torch.Tensor | None) -> torch.Tensor:
    """0-dim mean_b weight_b (-gamma^k_b reward_b + alpha kl_b) in reward's dtype."""
    loss = torch.empty((), dtype=reward.dtype, device=reward.device)
    _loss_forward_kernel[(1,)](reward, kl, k, weight, loss, reward.shape[0], _log2_gamma(gamma), float(alpha),
                               CT=compute_dtypes(reward.dtype)[1], BLOCK=BLOCK, num_warps=4)
    return loss


def sqdf_loss_backward(grad: torch.Tensor, reward: torch.Tensor, kl: torch.Tensor, k: torch.Tensor, gamma: float,
                       alpha: float, weight: torch.Tensor | None, need_reward: bool, need_kl: bool,
                       need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad_reward, grad_kl, grad_weight) for the 0-dim upstream grad; None where not needed (or weight absent)."""
    grads = tuple(torch.empty_like(reward) if wanted else None
                  for wanted in (need_reward, need_kl, need_weight and weight is not None))
    if any(g is not None for g in grads):
        batch = reward.shape[0]
        _loss_backward_kernel[(triton.cdiv(batch, BLOCK),)](
            grad, reward, kl, k, weight, *grads, batch, _log2_gamma(gamma), float(alpha),
            CT=compute_dtypes(reward.dtype)[1], BLOCK=BLOCK, num_warps=4)
    return grads
