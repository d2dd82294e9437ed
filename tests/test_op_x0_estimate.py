"""The x0 estimate (`ops.tweedie_x0`, `consistency_x0`; sqdf_fast/ops/x0_estimate.py) on every backend x dtype x
shape x layout against the float64 reference, to the precision rule of `ops_common`; 16-bit rounding; gradcheck in
float64; bad input.
"""
from __future__ import annotations

import math

import pytest
import torch
from ops_common import (  # noqa: F401 (serial_torch_unless_cpp: an autouse fixture)
    DTYPES,
    F64,
    LAYOUTS,
    SHAPES,
    assert_precision,
    make,
    schedule_values,
    serial_torch_unless_cpp,
    zeros,
)

from sqdf_fast import ops
from sqdf_fast.ops import dispatch, reference


@pytest.mark.parametrize("scalings", [False, True], ids=["tweedie", "consistency"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_x0_estimate_forward_backward(backend, gen, dtype, shape, layout, scalings):
    x, eps = (make(gen, shape, dtype, layout).requires_grad_() for _ in range(2))
    a, _ = schedule_values(shape[0])
    c_skip, c_out = (torch.rand(shape[0], generator=gen, dtype=F64) for _ in range(2)) if scalings else (None, None)
    got = ops.consistency_x0(x, eps, a, c_skip, c_out) if scalings else ops.tweedie_x0(x, eps, a)
    x64, eps64 = (v.detach().double().requires_grad_() for v in (x, eps))
    exact = reference.consistency_x0(x64, eps64, a, 0.0 if c_skip is None else c_skip, 1.0 if c_out is None else c_out)
    xp, epsp = (v.detach().requires_grad_() for v in (x, eps))
    plain = reference.consistency_x0(xp, epsp, a.to(dtype), 0.0 if c_skip is None else c_skip.to(dtype),
                                     1.0 if c_out is None else c_out.to(dtype))
    assert got.dtype == dtype and got.shape == shape
    assert_precision("x0", got, exact, plain, dtype)
    g = make(gen, shape, dtype)
    for name, grads, e, p in zip(("x", "eps"), torch.autograd.grad((got * g).sum(), (x, eps)),
                                 torch.autograd.grad((exact * g.double()).sum(), (x64, eps64)),
                                 torch.autograd.grad((plain * g).sum(), (xp, epsp))):
        assert_precision(f"grad {name}", grads, e, p, dtype)


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # inf and NaN inputs, on purpose
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_16_bit_outputs_round_to_nearest_even(backend, gen, dtype):
    """Every backend computes in fp32 and rounds once (the torch backend upcasts its 16-bit inputs): x0 with
    c_skip = s and c_out = 0 is s * x, so every 16-bit value must survive s = 1 bitwise (NaN stays NaN), and any
    product must round exactly as torch rounds it (ties to even, overflow to inf, gradual underflow). The Triton
    interpreter truncates to bf16, so this also checks the kernels' explicit rounding there."""
    every_value = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)[:, None]
    half, zero = torch.full((every_value.shape[0],), 0.5), torch.zeros(every_value.shape[0])
    same = ops.consistency_x0(every_value, torch.ones_like(every_value), half, half * 2, zero)
    torch.testing.assert_close(same, every_value, rtol=0, atol=0, equal_nan=True)

    finfo = torch.finfo(dtype)
    magnitudes = torch.cat([
        torch.logspace(math.log2(finfo.tiny) - 12, math.log2(finfo.max) + 1, 4000, base=2.0, dtype=F64),
        torch.tensor([finfo.max, finfo.tiny, finfo.tiny / 8, 0.0, math.inf, math.nan], dtype=F64)])
    x = (magnitudes * torch.randn(magnitudes.shape, generator=gen, dtype=F64).sign()).to(dtype)[:, None]
    # 1.5 x makes exact ties between two 16-bit neighbours, which must go to the even one
    scale = torch.where(torch.arange(x.shape[0]) % 2 == 0, 1.5, 0.25 + 1.5 * torch.rand(x.shape[0], generator=gen))
    got = ops.consistency_x0(x, torch.ones_like(x), torch.full_like(scale, 0.5), scale, torch.zeros_like(scale))
    torch.testing.assert_close(got, (scale[:, None] * x.float()).to(dtype), rtol=0, atol=0, equal_nan=True)


def test_gradcheck_x0_estimate(backend, gen):
    # the smallest shape with per-sample values (B = 2) and several elements per sample: every element gradcheck
    # perturbs costs two (interpreted, for triton) launches
    a, _ = schedule_values(2)
    c_skip, c_out = torch.rand(2, generator=gen, dtype=F64), torch.rand(2, generator=gen, dtype=F64)
    x, eps = (make(gen, (2, 3), F64).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(lambda x, eps: ops.consistency_x0(x, eps, a, c_skip, c_out), (x, eps))
    assert torch.autograd.gradcheck(lambda x, eps: ops.tweedie_x0(x, eps, a), (x, eps))


@pytest.mark.parametrize("override, match", [
    pytest.param(dict(eps=zeros(2, 4)), "^eps has shape", id="eps shape"),
    pytest.param(dict(alpha_t=0.0), "alpha_t", id="alpha_t=0"),
    pytest.param(dict(alpha_t=1e-50), "^alpha_t must lie in", id="alpha_t 0 in float32"),
    pytest.param(dict(alpha_t=torch.tensor([0.5, math.nan])), "^alpha_t must lie in", id="alpha_t NaN"),
    pytest.param(dict(alpha_t=torch.tensor([0.5, 1.5])), "^alpha_t must lie in", id="alpha_t 1.5"),
    pytest.param(dict(alpha_t=torch.full((3,), 0.5, dtype=F64)), "alpha_t", id="alpha_t length"),
    pytest.param(dict(x=zeros(0, 3), eps=zeros(0, 3)), "^x must have a non-empty batch", id="empty batch"),
])
def test_tweedie_rejects_bad_input(backend, override, match):
    with pytest.raises(ValueError, match=match):
        ops.tweedie_x0(**{**dict(x=zeros(2, 3), eps=zeros(2, 3), alpha_t=0.5), **override})


# the domain's edges (docs/ops.md §5) ------------------------------------------------------------------------------
def test_x0_at_the_domain_edges(backend, gen):
    """alpha_t = 1 (the clean end): x0 = x exactly; a tiny alpha_t stays finite; no elements per sample runs."""
    x, eps = (make(gen, (3, 2, 4), torch.float32) for _ in range(2))
    assert torch.equal(ops.tweedie_x0(x, eps, 1.0), x)
    a = torch.tensor([1e-30, 3.8e-5, 1.0])
    torch.testing.assert_close(ops.tweedie_x0(x, eps, a).double(),
                               reference.tweedie_x0(x.double(), eps.double(), a.double()), rtol=1e-6, atol=0)
    empty = zeros(3, 0).requires_grad_()
    out = ops.consistency_x0(empty, empty, a, 0.5, 2.0)
    assert out.shape == (3, 0) and torch.autograd.grad(out.sum(), empty)[0].shape == (3, 0)


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("name", ("torch", "cpp", "triton"))
def test_outside_the_domain_every_backend_gives_nan(name, gen):
    """Unchecked values (on a device they are not read: docs/ops.md §5) outside 0 < alpha_t <= 1 give NaN for their
    sample on every backend, a = 0 included (where the formula gives infinities); called below the checks."""
    if name == "triton" and dispatch.triton_status("cpu")[0] is False:
        pytest.skip("triton not in interpreter mode")
    a = torch.tensor([0.5, 0.0, -0.5, 1.5, 1.0])
    x, eps = make(gen, (5, 3), torch.float32), make(gen, (5, 3), torch.float32)
    c_skip = torch.full((5,), 0.25)
    if name == "torch":
        x0 = reference.consistency_x0(x, eps, a, c_skip, 1.0)
        grad_x = None
    else:
        launch = dispatch.launchers(name)
        x0 = launch.x0_estimate_forward(x, eps, a, c_skip, None)
        grad_x, _ = launch.x0_estimate_backward(torch.ones_like(x), a, c_skip, None, True, True)
    nan_rows = torch.tensor([False, True, True, True, False])
    assert bool(x0[nan_rows].isnan().all()) and bool(x0[~nan_rows].isfinite().all())
    if grad_x is not None:
        assert bool(grad_x[nan_rows].isnan().all()) and bool(grad_x[~nan_rows].isfinite().all())
