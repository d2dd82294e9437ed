"""One-step x0 estimate (Tweedie's posterior mean, or the consistency-model boundary form), forward and backward.

Maths, per sample b (a = alpha_t[b]; c_skip = 0 and c_out = 1 when absent):

    x0 = c_skip x + c_out (x - sqrt(1 - a) eps) / sqrt(a) = p x + q eps,
    p  = c_skip + c_out / sqrt(a),   q = -c_out sqrt(1 - a) / sqrt(a)
    grad_x = p grad,   grad_eps = q grad

Domain 0 < a <= 1 (docs/ops.md §5): p and q are NaN for a sample outside it.

Kernels: `_x0_forward_kernel` reads x and eps once and writes x0; `_x0_backward_kernel` reads grad once and writes
the requested gradients. Both run over (B, D) tiles (see `_common`), compute p and q per sample row from the (B,)
tensors in float64 (as the C++ backend does), and work in the compute dtype (float64 for float64 inputs, float32
otherwise). They are elementwise, so the autotuned tile never changes a result bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    NAN,
    batch_dims,
    compute_dtypes,
    elementwise,
    load_per_sample,
    load_tile,
    sample_tile,
    store_tile,
    tile_grid,
)


@triton.jit
def _x0_coefficients(alpha_t_ptr, c_skip_ptr, c_out_ptr, rows, B, CT: tl.constexpr):
    """(p, q) of the tile's samples, (ROWS, 1) each: computed in float64, as the C++ backend does, then rounded to
    the compute dtype; NaN outside the domain 0 < a <= 1."""
    a = load_per_sample(alpha_t_ptr, rows, B, tl.float64)
    a = tl.where((a > 0) & (a <= 1), a, NAN)
    c_skip = 0.0
    c_out = 1.0
    if c_skip_ptr is not None:
        c_skip = load_per_sample(c_skip_ptr, rows, B, tl.float64)
    if c_out_ptr is not None:
        c_out = load_per_sample(c_out_ptr, rows, B, tl.float64)
    sqrt_a = tl.sqrt(a)
    p = c_skip + c_out / sqrt_a
    q = -c_out * tl.sqrt(1 - a) / sqrt_a
    return p.to(CT)[:, None], q.to(CT)[:, None]


@elementwise
@triton.jit
def _x0_forward_kernel(x_ptr, eps_ptr, alpha_t_ptr, c_skip_ptr, c_out_ptr, x0_ptr, B, D,
                       CT: tl.constexpr, TILE: tl.constexpr, COLS: tl.constexpr):
    rows, offs, mask = sample_tile(B, D, TILE, COLS)
    p, q = _x0_coefficients(alpha_t_ptr, c_skip_ptr, c_out_ptr, rows, B, CT)
    x = load_tile(x_ptr, offs, mask, CT)
    eps = load_tile(eps_ptr, offs, mask, CT)
    store_tile(x0_ptr, offs, mask, p * x + q * eps)


@elementwise
@triton.jit
def _x0_backward_kernel(grad_ptr, alpha_t_ptr, c_skip_ptr, c_out_ptr, grad_x_ptr, grad_eps_ptr, B, D,
                        CT: tl.constexpr, TILE: tl.constexpr, COLS: tl.constexpr):
    rows, offs, mask = sample_tile(B, D, TILE, COLS)
    p, q = _x0_coefficients(alpha_t_ptr, c_skip_ptr, c_out_ptr, rows, B, CT)
    grad = load_tile(grad_ptr, offs, mask, CT)
    if grad_x_ptr is not None:
        store_tile(grad_x_ptr, offs, mask, p * grad)
    if grad_eps_ptr is not None:
        store_tile(grad_eps_ptr, offs, mask, q * grad)


def x0_estimate_forward(x: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, c_skip: torch.Tensor | None,
                        c_out: torch.Tensor | None) -> torch.Tensor:
    """c_skip x + c_out (x - sqrt(1 - a) eps) / sqrt(a), x's dtype; c_skip None = 0, c_out None = 1."""
    batch, d = batch_dims(x)
    x0 = torch.empty_like(x)
    if d == 0:
        return x0
    _x0_forward_kernel[tile_grid(batch, d)](x, eps, alpha_t, c_skip, c_out, x0, batch, d,
                                            CT=compute_dtypes(x.dtype)[1])
    return x0


def x0_estimate_backward(grad: torch.Tensor, alpha_t: torch.Tensor, c_skip: torch.Tensor | None,
                         c_out: torch.Tensor | None, need_x: bool,
                         need_eps: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_x, grad_eps) = ((c_skip + c_out / sqrt(a)) grad, -c_out sqrt(1 - a) / sqrt(a) grad), None if not needed."""
    grad_x = torch.empty_like(grad) if need_x else None
    grad_eps = torch.empty_like(grad) if need_eps else None
    batch, d = batch_dims(grad)
    if d > 0 and (need_x or need_eps):
        _x0_backward_kernel[tile_grid(batch, d)](grad, alpha_t, c_skip, c_out, grad_x, grad_eps, batch, d,
                                                 CT=compute_dtypes(grad.dtype)[1])
    return grad_x, grad_eps
