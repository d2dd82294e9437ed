"""The one-step x0 estimate: `tweedie_x0` and `consistency_x0` (LCM's boundary form around an epsilon network).

Maths: `reference.consistency_x0` (torch) and the docstring of kernels/x0_estimate.py (forward and backward).
Layout as `guided_step`: checks once, then the torch reference, `_X0Estimate` (eager autograd over a fused
backend's launchers) or, inside torch.compile, the opaque custom ops `sqdf::x0_estimate{,_backward}`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sqdf_fast.ops import dispatch, reference
from sqdf_fast.ops.checks import check_tensor, check_x, per_sample
from sqdf_fast.ops.custom import empty_if_none, none_if_empty


def consistency_x0(x: Tensor, eps: Tensor, alpha_t: Tensor | float, c_skip: Tensor | float | None = None,
                   c_out: Tensor | float | None = None) -> Tensor:
    """c_skip x + c_out (x - sqrt(1 - alpha_t) eps) / sqrt(alpha_t): a consistency model's boundary form (LCM)
    around an epsilon network; plain Tweedie when c_skip, c_out are None. Differentiable in x and eps: grad_x =
    (c_skip + c_out / sqrt(a)) g, grad_eps = -c_out sqrt(1 - a) / sqrt(a) g.

    Domain (docs/ops.md §5): 0 < alpha_t <= 1 (alpha_t = 1: x0 = x), c_skip and c_out not NaN. Values outside it
    raise a ValueError naming the argument where readable without a host sync (Python floats, CPU tensors); on an
    accelerator an alpha_t outside it gives NaN for its sample, on every backend."""
    check_x(x)
    check_tensor("eps", eps, x)
    alpha_t = per_sample("alpha_t", alpha_t, x, 0.0, 1.0)
    c_skip, c_out = (None if value is None else per_sample(name, value, x, -float("inf"), float("inf"))
                     for name, value in (("c_skip", c_skip), ("c_out", c_out)))
    backend = dispatch.backend_of(x)
    x, eps = x.contiguous(), eps.contiguous()
    if backend == "torch":  # in the compute dtype, as the fused backends: 16-bit inputs upcast, results rounded back
        return reference.consistency_x0(x.to(alpha_t.dtype), eps.to(alpha_t.dtype), alpha_t,
                                        0.0 if c_skip is None else c_skip, 1.0 if c_out is None else c_out).to(x.dtype)
    if torch.compiler.is_compiling():
        return _x0_estimate_op(x, eps, alpha_t, c_skip, c_out, backend)
    return _X0Estimate.apply(dispatch.launchers(backend), x, eps, alpha_t, c_skip, c_out)


def tweedie_x0(x: Tensor, eps: Tensor, alpha_t: Tensor | float) -> Tensor:
    """Posterior-mean estimate x0_hat = (x - sqrt(1 - alpha_t) eps) / sqrt(alpha_t); differentiable in x and eps.
    Domain and edges as `consistency_x0`."""
    return consistency_x0(x, eps, alpha_t)


# --- autograd: one backward for the eager Function and the compiled custom op -----------------------------------
def _backward(launch_backward, saved, need, grad):
    alpha_t, c_skip, c_out = saved
    return (*launch_backward(grad.contiguous(), alpha_t, c_skip, c_out, need[0], need[1]), None, None, None)


class _X0Estimate(torch.autograd.Function):
    """Eager autograd over a fused backend's launchers (`launch`, the backend's module)."""

    @staticmethod
    def forward(ctx, launch, x, eps, alpha_t, c_skip, c_out):
        ctx.save_for_backward(alpha_t, c_skip, c_out)
        ctx.launch = launch
        return launch.x0_estimate_forward(x, eps, alpha_t, c_skip, c_out)

    @staticmethod
    def backward(ctx, grad):
        return (None, *_backward(ctx.launch.x0_estimate_backward, ctx.saved_tensors, ctx.needs_input_grad[1:], grad))


@torch.library.custom_op("sqdf::x0_estimate", mutates_args=())
def _x0_estimate_op(x: Tensor, eps: Tensor, alpha_t: Tensor, c_skip: Optional[Tensor], c_out: Optional[Tensor],
                    backend: str) -> Tensor:
    return dispatch.launchers(backend).x0_estimate_forward(x, eps, alpha_t, c_skip, c_out)


@_x0_estimate_op.register_fake
def _(x, eps, alpha_t, c_skip, c_out, backend):
    return torch.empty_like(x)


@torch.library.custom_op("sqdf::x0_estimate_backward", mutates_args=())
def _x0_estimate_backward_op(grad: Tensor, alpha_t: Tensor, c_skip: Optional[Tensor], c_out: Optional[Tensor],
                             need_x: bool, need_eps: bool, backend: str) -> tuple[Tensor, Tensor]:
    grads = dispatch.launchers(backend).x0_estimate_backward(grad, alpha_t, c_skip, c_out, need_x, need_eps)
    return tuple(empty_if_none(g, grad) for g in grads)


@_x0_estimate_backward_op.register_fake
def _(grad, alpha_t, c_skip, c_out, need_x, need_eps, backend):
    return tuple(torch.empty_like(grad) if p else grad.new_empty((0,)) for p in (need_x, need_eps))


def _setup_context(ctx, inputs, output):
    _, _, alpha_t, c_skip, c_out, backend = inputs
    ctx.save_for_backward(alpha_t, c_skip, c_out)
    ctx.backend = backend


def _op_backward(ctx, grad):
    def launch_backward(*args):
        return tuple(none_if_empty(g) for g in _x0_estimate_backward_op(*args, ctx.backend))
    return (*_backward(launch_backward, ctx.saved_tensors, ctx.needs_input_grad, grad), None)


_x0_estimate_op.register_autograd(_op_backward, setup_context=_setup_context)
