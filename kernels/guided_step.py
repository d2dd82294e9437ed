"""Classifier-free-guided DDIM policy step with the method's KL term, forward and backward.

Maths, per sample b (a = alpha_t[b], a' = alpha_prev[b], D elements per sample):

    sigma = eta sqrt((1 - a') / (1 - a) (1 - a / a'))
    c_x   = sqrt(a') / sqrt(a),   c_eps = sqrt(1 - a' - sigma^2) - c_x sqrt(1 - a)
    eps   = eps_u + w (eps_c - eps_u)      (eps_c alone without eps_u; eps_ref alike from the reference)
    x_prev = c_x x + c_eps eps + sigma noise
    kl     = c_eps^2 / sigma^2 mean_D (eps - eps_ref)^2          (0 when D = 0)

Backward, with g = dL/dx_prev, h = dL/dkl 2 c_eps^2 / (D sigma^2) and diff = eps - eps_ref:

    ge = c_eps g + h diff,   gr = -h diff
    grad_x = c_x g,   grad_noise = sigma g,   (grad_eps_c, grad_eps_u) = (w ge, (1 - w) ge)   (ge alone without eps_u)
    and gr split alike between the reference's two epsilons.

The coefficients are computed per sample in float64 (whatever the compute dtype) in forms free of cancellation, the
same sequence as the C++ backend and `sqdf_fast.ops.reference.ddim_coefficients`, with r = (a' - a) / ((1 - a) a'):

    sigma = eta sqrt((1 - a') r),   v = 1 - a' - sigma^2 = (1 - a') ((1 - eta^2) + eta^2 a (1 - a') / ((1 - a) a'))
    c_eps = -((a' - a) / a + sigma^2) / (sqrt(v) + c_x sqrt(1 - a)),   ratio = c_eps / sigma

Domain (docs/ops.md §5) 0 < a <= a' <= 1 with v >= 0 (always at eta <= 1): at a = a' the step is the identity
(c_x = 1, c_eps = sigma = 0, kl = 0); outside it every coefficient is NaN, and the KL also where sigma = 0 at a < a'.

Kernels (tiling in `_common`): every program computes its samples' coefficients in float64 from the (B,) schedule
tensors, rounds them to the compute dtype, then streams its tile in the compute dtype, reading each input once and
writing each output once. Absent inputs and unneeded outputs are None pointers, which triton specialises away.

- `_forward_kernel` writes x_prev and, with a reference, the tile's sum of diff^2. The KL is reduced without atomics:
  with one tile per sample the program writes kl[b] itself; otherwise it writes partials[pid] and
  `_kl_finalize_kernel` (one program per sample) sums that row in a fixed order. The reduction therefore runs at a
  fixed tile size and warp count (KL_CONFIG), making kl bitwise reproducible; without a reference the forward is
  elementwise and autotuned like the backward. With D = 0 only `_kl_empty_kernel` runs (the KL, 0 or NaN).
- `_backward_kernel` is elementwise (h is a per-sample scalar): it reads g, and eps / eps_ref only when h is.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    INTERPRET_TILE,
    NAN,
    batch_dims,
    compute_dtypes,
    elementwise,
    load_per_sample,
    load_tile,
    sample_tile,
    scalar_arg,
    store_tile,
    tile_cols,
    tile_grid,
)

# Tile of the KL-producing forward, never autotuned: the partial sums, hence the bits of kl, depend on the tile
# shape and warp count, which are thus functions of D alone. 8 elements per thread on the GPU.
KL_TILE, KL_WARPS = (INTERPRET_TILE, 4) if INTERPRET else (2048, 8)
FINALIZE_TILE = 1024  # partial sums one finalize step adds (over one or several samples)


@triton.jit
def _ddim_coefficients(alpha_t_ptr, alpha_prev_ptr, rows, B, eta):
    """(c_x, c_eps, sigma, ratio) of the tile's samples, (ROWS,) each, in float64 whatever the compute dtype: the
    forms, edges and order of operations of the C++ backend's step_coef (see the module docstring)."""
    a = load_per_sample(alpha_t_ptr, rows, B, tl.float64)
    ap = load_per_sample(alpha_prev_ptr, rows, B, tl.float64)
    eta64 = scalar_arg(eta, tl.float64)
    step = (a > 0) & (a < ap) & (ap <= 1)
    same = (a > 0) & (a == ap) & (ap <= 1)
    a = tl.where(step, a, 0.25)  # stand-ins off the proper steps: no lane divides by zero
    ap = tl.where(step, ap, 0.5)
    one_a = 1 - a
    one_ap = 1 - ap
    delta = ap - a
    eta2 = eta64 * eta64
    r = delta / (one_a * ap)
    sigma_sq = eta2 * one_ap * r
    v = one_ap * ((1 - eta2) + eta2 * (a * one_ap / (one_a * ap)))
    step = step & (v >= 0)
    c_x = tl.sqrt(ap) / tl.sqrt(a)
    c_eps = -(delta / a + sigma_sq) / (tl.sqrt(tl.where(v >= 0, v, 0.0)) + c_x * tl.sqrt(one_a))
    sigma = eta64 * tl.sqrt(one_ap * r)
    ratio = tl.where(sigma > 0, c_eps / tl.where(sigma > 0, sigma, 1.0), NAN)
    c_x = tl.where(step, c_x, tl.where(same, 1.0, NAN))
    c_eps = tl.where(step, c_eps, tl.where(same, 0.0, NAN))
    sigma = tl.where(step, sigma, tl.where(same, 0.0, NAN))
    ratio = tl.where(step, ratio, tl.where(same, 0.0, NAN))
    return c_x, c_eps, sigma, ratio


@triton.jit
def _kl(ratio, total, D, CT: tl.constexpr):
    """kl = ratio^2 total / D from the sum of diff^2, in float64 as the C++ backend (ratio^2 alone may overflow the
    compute dtype where the KL does not), rounded to the compute dtype."""
    return (ratio * ratio * total.to(tl.float64) / D).to(CT)


@triton.jit
def _guided(cond_ptr, uncond_ptr, w, offs, mask, CT: tl.constexpr):
    eps = load_tile(cond_ptr, offs, mask, CT)
    if uncond_ptr is not None:
        uncond = load_tile(uncond_ptr, offs, mask, CT)
        eps = uncond + w * (eps - uncond)
    return eps


@triton.jit
def _store_guided_grad(cond_ptr, uncond_ptr, grad, w, offs, mask):
    # d(eps_u + w (eps_c - eps_u)) / d(eps_c, eps_u) = (w, 1 - w)
    if uncond_ptr is not None:
        store_tile(cond_ptr, offs, mask, w * grad)
        store_tile(uncond_ptr, offs, mask, (1 - w) * grad)
    else:
        store_tile(cond_ptr, offs, mask, grad)


@triton.jit
def _forward_kernel(x_ptr, eps_c_ptr, eps_u_ptr, ref_c_ptr, ref_u_ptr, noise_ptr, alpha_t_ptr, alpha_prev_ptr,
                    x_prev_ptr, kl_ptr, B, D, eta: tl.float64, w: tl.float64,
                    CT: tl.constexpr, KL_PARTIAL: tl.constexpr, TILE: tl.constexpr, COLS: tl.constexpr):
    rows, offs, mask = sample_tile(B, D, TILE, COLS)
    c_x, c_eps, sigma, ratio = _ddim_coefficients(alpha_t_ptr, alpha_prev_ptr, rows, B, eta)
    c_x, c_eps, sigma = c_x.to(CT), c_eps.to(CT), sigma.to(CT)
    w_ct = scalar_arg(w, CT)
    eps = _guided(eps_c_ptr, eps_u_ptr, w_ct, offs, mask, CT)
    x_prev = c_x[:, None] * load_tile(x_ptr, offs, mask, CT) + c_eps[:, None] * eps
    if noise_ptr is not None:
        x_prev += sigma[:, None] * load_tile(noise_ptr, offs, mask, CT)
    store_tile(x_prev_ptr, offs, mask, x_prev)
    if ref_c_ptr is not None:
        diff = eps - _guided(ref_c_ptr, ref_u_ptr, w_ct, offs, mask, CT)
        total = tl.sum(diff * diff, axis=1)
        if KL_PARTIAL:
            # Several chunks per sample means one sample per tile: program pid holds partial (sample, chunk) = pid.
            tl.static_assert(TILE == COLS)
            tl.store(kl_ptr + tl.program_id(0) + tl.arange(0, 1), total)
        else:
            tl.store(kl_ptr + rows, _kl(ratio, total, D, CT), mask=rows < B)


# Without a reference the forward is elementwise: autotuned like the backward (same kernel, other launch configs).
_forward_kernel_tuned = elementwise(_forward_kernel)


@triton.jit
def _kl_finalize_kernel(partials_ptr, alpha_t_ptr, alpha_prev_ptr, kl_ptr, B, D, n_chunks, eta: tl.float64,
                        CT: tl.constexpr, TILE: tl.constexpr, COLS: tl.constexpr):
    """kl[b] = scale_b * sum_chunk partials[b, chunk], summed in a fixed order, ROWS samples per program."""
    ROWS: tl.constexpr = TILE // COLS
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    row_ptrs = partials_ptr + rows.to(tl.int64)[:, None] * n_chunks
    acc = tl.zeros([ROWS, COLS], CT)
    for start in range(0, n_chunks, COLS):
        mask = (rows < B)[:, None] & (start + cols < n_chunks)[None, :]
        acc += tl.load(row_ptrs + start + cols[None, :], mask=mask, other=0.0)
    ratio = _ddim_coefficients(alpha_t_ptr, alpha_prev_ptr, rows, B, eta)[3]
    tl.store(kl_ptr + rows, _kl(ratio, tl.sum(acc, axis=1), D, CT), mask=rows < B)


@triton.jit
def _kl_empty_kernel(alpha_t_ptr, alpha_prev_ptr, kl_ptr, B, eta: tl.float64, BLOCK: tl.constexpr):
    """kl of samples with no elements (D = 0): 0, NaN outside the domain."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ratio = _ddim_coefficients(alpha_t_ptr, alpha_prev_ptr, rows, B, eta)[3]
    tl.store(kl_ptr + rows, ratio * ratio * 0.0, mask=rows < B)


@elementwise
@triton.jit
def _backward_kernel(g_ptr, grad_kl_ptr, eps_c_ptr, eps_u_ptr, ref_c_ptr, ref_u_ptr, alpha_t_ptr, alpha_prev_ptr,
                     grad_x_ptr, grad_eps_c_ptr, grad_eps_u_ptr, grad_ref_c_ptr, grad_ref_u_ptr, grad_noise_ptr, B, D,
                     eta: tl.float64, w: tl.float64, CT: tl.constexpr, TILE: tl.constexpr, COLS: tl.constexpr):
    rows, offs, mask = sample_tile(B, D, TILE, COLS)
    c_x, c_eps, sigma, ratio = _ddim_coefficients(alpha_t_ptr, alpha_prev_ptr, rows, B, eta)
    c_x, c_eps, sigma = c_x.to(CT), c_eps.to(CT), sigma.to(CT)
    if g_ptr is not None:
        g = load_tile(g_ptr, offs, mask, CT)
    else:
        g = tl.zeros(offs.shape, CT)
    if grad_x_ptr is not None:
        store_tile(grad_x_ptr, offs, mask, c_x[:, None] * g)
    if grad_noise_ptr is not None:
        store_tile(grad_noise_ptr, offs, mask, sigma[:, None] * g)
    if grad_eps_c_ptr is not None or grad_ref_c_ptr is not None:
        w_ct = scalar_arg(w, CT)
        ge = c_eps[:, None] * g
        gr = tl.zeros(offs.shape, CT)
        if grad_kl_ptr is not None:  # the launcher passes grad_kl only together with a reference
            h = (2 * load_per_sample(grad_kl_ptr, rows, B, tl.float64) * ratio * ratio / D).to(CT)
            h_diff = h[:, None] * (_guided(eps_c_ptr, eps_u_ptr, w_ct, offs, mask, CT)
                                   - _guided(ref_c_ptr, ref_u_ptr, w_ct, offs, mask, CT))
            ge += h_diff
            gr = -h_diff
        if grad_eps_c_ptr is not None:
            _store_guided_grad(grad_eps_c_ptr, grad_eps_u_ptr, ge, w_ct, offs, mask)
        if grad_ref_c_ptr is not None:
            _store_guided_grad(grad_ref_c_ptr, grad_ref_u_ptr, gr, w_ct, offs, mask)


def _check_guidance(eps_uncond, eps_ref_cond, eps_ref_uncond) -> None:
    # One guidance weight serves policy and reference: the reference is guided exactly when the policy is.
    if eps_ref_cond is None and eps_ref_uncond is not None or (
            eps_ref_cond is not None and (eps_uncond is None) != (eps_ref_uncond is None)):
        raise ValueError("triton launcher: eps_ref_uncond must be given exactly when eps_uncond and eps_ref_cond are")


def guided_step_forward(x: torch.Tensor, eps_cond: torch.Tensor, eps_uncond: torch.Tensor | None,
                        eps_ref_cond: torch.Tensor | None, eps_ref_uncond: torch.Tensor | None,
                        noise: torch.Tensor | None, alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: float,
                        w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_prev, kl); kl is (B,) of the compute dtype, or empty without eps_ref_cond. noise None is zero noise."""
    _check_guidance(eps_uncond, eps_ref_cond, eps_ref_uncond)
    batch, d = batch_dims(x)
    ct, tl_ct = compute_dtypes(x.dtype)
    x_prev = torch.empty_like(x)
    if d == 0:  # nothing to step; the KL of samples with no elements is 0 (NaN outside the domain), on the device
        kl = torch.empty(batch if eps_ref_cond is not None else 0, dtype=ct, device=x.device)
        if eps_ref_cond is not None:
            _kl_empty_kernel[(triton.cdiv(batch, FINALIZE_TILE),)](alpha_t, alpha_prev, kl, batch, float(eta),
                                                                   BLOCK=FINALIZE_TILE)
        return x_prev, kl
    args = (x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise, alpha_t, alpha_prev, x_prev)
    if eps_ref_cond is None:
        _forward_kernel_tuned[tile_grid(batch, d)](*args, None, batch, d, float(eta), float(w), CT=tl_ct,
                                                   KL_PARTIAL=False)
        return x_prev, torch.empty(0, dtype=ct, device=x.device)
    kl = torch.empty(batch, dtype=ct, device=x.device)
    cols = tile_cols(d, KL_TILE)
    n_chunks = triton.cdiv(d, cols)
    partials = torch.empty(batch * n_chunks, dtype=ct, device=x.device) if n_chunks > 1 else kl
    _forward_kernel[(triton.cdiv(batch, KL_TILE // cols) * n_chunks,)](
        *args, partials, batch, d, float(eta), float(w), CT=tl_ct, KL_PARTIAL=n_chunks > 1, TILE=KL_TILE,
        COLS=cols, num_warps=KL_WARPS)
    if n_chunks > 1:
        fin_cols = tile_cols(n_chunks, FINALIZE_TILE)
        _kl_finalize_kernel[(triton.cdiv(batch, FINALIZE_TILE // fin_cols),)](
            partials, alpha_t, alpha_prev, kl, batch, d, n_chunks, float(eta), CT=tl_ct, TILE=FINALIZE_TILE,
            COLS=fin_cols, num_warps=4)
    return x_prev, kl


def guided_step_backward(grad_x_prev: torch.Tensor | None, grad_kl: torch.Tensor | None, eps_cond: torch.Tensor,
                         eps_uncond: torch.Tensor | None, eps_ref_cond: torch.Tensor | None,
                         eps_ref_uncond: torch.Tensor | None, alpha_t: torch.Tensor, alpha_prev: torch.Tensor,
                         eta: float, w: float, need_x: bool, need_eps: bool, need_ref: bool,
                         need_noise: bool) -> tuple[torch.Tensor | None, ...]:
    """(grad_x, grad_eps_cond, grad_eps_uncond, grad_eps_ref_cond, grad_eps_ref_uncond, grad_noise), each None
    where not needed or its input is absent; grad_x_prev / grad_kl None count as zero."""
    _check_guidance(eps_uncond, eps_ref_cond, eps_ref_uncond)
    need_ref = need_ref and eps_ref_cond is not None

    def out(wanted: bool) -> torch.Tensor | None:
        return torch.empty_like(eps_cond) if wanted else None

    grads = (out(need_x), out(need_eps), out(need_eps and eps_uncond is not None), out(need_ref),
             out(need_ref and eps_ref_uncond is not None), out(need_noise))
    batch, d = batch_dims(eps_cond)
    if d > 0 and (need_x or need_eps or need_ref or need_noise):
        with_kl = grad_kl is not None and eps_ref_cond is not None
        _backward_kernel[tile_grid(batch, d)](
            grad_x_prev, grad_kl if with_kl else None, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond,
            alpha_t, alpha_prev, *grads, batch, d, float(eta), float(w), CT=compute_dtypes(eps_cond.dtype)[1])
    return grads
