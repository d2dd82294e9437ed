"""The C++ backend's launchers (sqdf_fast.ops.cpp) against the float64 torch reference.

Launcher level only: the public ops over every backend, and gradcheck through autograd, are in test_ops.py.
Low-precision inputs are rounded first, and the reference runs in float64 on those rounded values, so the exact
answer is known: float32 results must agree to float32 rounding, and bfloat16/float16 results (computed in fp32)
must lie within one ulp of the exact value rounded to their dtype.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from sqdf_fast.ops import cpp, reference

if not cpp.available():
    pytest.skip(f"C++ backend unavailable: {cpp.unavailable_reason()}", allow_module_level=True)

F64 = torch.float64
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(2, 4, 8, 8), (1, 3, 7, 5), (33, 5), (3,)]
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}
ETA, W = 0.8, 3.5


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else torch.float32


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of dtype at each value of the float64 tensor v (subnormal spacing below the normal range)."""
    magnitude = v.to(dtype).double().abs().clamp_min(torch.finfo(dtype).tiny)
    _, exponent = torch.frexp(magnitude)
    return torch.ldexp(torch.ones_like(v), exponent - 1 - MANTISSA_BITS[dtype])


def assert_matches(got: torch.Tensor, exact: torch.Tensor, name: str = "") -> None:
    """got (any dtype) against the float64 exact value, to the rounding of got's dtype."""
    assert got.shape == exact.shape, name
    exact = exact.detach()
    if got.dtype == F64:
        torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-12, msg=name)
    elif got.dtype == torch.float32:
        scale = exact.abs().max().item()
        torch.testing.assert_close(got.double(), exact, rtol=4e-6, atol=1e-6 * scale, msg=name)
    else:
        # one ulp of the rounded exact value; the floor covers fp32 arithmetic error where terms cancel
        err = (got.double() - exact).abs()
        bound = ulp(exact, got.dtype) + 1e-6 * exact.abs().max()
        assert bool((err <= bound).all()), f"{name}: {int((err > bound).sum())} values off by more than one ulp"


def randn(gen: torch.Generator, shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype)


def schedule(gen: torch.Generator, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (alpha_t, alpha_prev) in the compute dtype, 0 < alpha_t < alpha_prev < 1."""
    alpha_t = 0.05 + 0.8 * torch.rand(batch, generator=gen, dtype=F64)
    alpha_prev = alpha_t + (1 - alpha_t) * (0.05 + 0.9 * torch.rand(batch, generator=gen, dtype=F64))
    ct = compute_dtype(dtype)
    return alpha_t.to(ct), alpha_prev.to(ct)


def step_inputs(gen, shape, dtype, uncond: bool, ref: bool, noise: bool) -> dict:
    x, eps_c, eps_u, ref_c, ref_u, n = (randn(gen, shape, dtype) for _ in range(6))
    alpha_t, alpha_prev = schedule(gen, shape[0], dtype)
    return dict(x=x, eps_cond=eps_c, eps_uncond=eps_u if uncond else None, eps_ref_cond=ref_c if ref else None,
                eps_ref_uncond=ref_u if ref and uncond else None, noise=n if noise else None, alpha_t=alpha_t,
                alpha_prev=alpha_prev, eta=ETA, w=W)


def reference_step(inputs: dict, grad_names=()) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """float64 reference of the step on the (rounded) inputs; leaves for the tensors named in grad_names, noise
    included (zero when absent) so that its gradient exists."""
    leaves = {}
    for name in ("x", "eps_cond", "eps_uncond", "eps_ref_cond", "eps_ref_uncond", "noise"):
        value = inputs[name]
        if name == "noise" and value is None:
            value = torch.zeros_like(inputs["x"])
        if value is not None:
            leaves[name] = value.double().requires_grad_(name in grad_names)
    x_prev, kl = reference.guided_policy_step(
        leaves["x"], leaves["eps_cond"], leaves.get("eps_uncond"), W, inputs["alpha_t"].double(),
        inputs["alpha_prev"].double(), ETA, leaves["noise"], leaves.get("eps_ref_cond"), leaves.get("eps_ref_uncond"))
    return x_prev, kl, leaves


def forward(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return cpp.guided_step_forward(inputs["x"], inputs["eps_cond"], inputs["eps_uncond"], inputs["eps_ref_cond"],
                                   inputs["eps_ref_uncond"], inputs["noise"], inputs["alpha_t"],
                                   inputs["alpha_prev"], ETA, W)


def backward(inputs: dict, grad_x_prev, grad_kl, need=(True, True, True, True)):
    return cpp.guided_step_backward(grad_x_prev, grad_kl, inputs["eps_cond"], inputs["eps_uncond"],
                                    inputs["eps_ref_cond"], inputs["eps_ref_uncond"], inputs["alpha_t"],
                                    inputs["alpha_prev"], ETA, W, *need)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_build_info_describes_the_library():
    info = cpp.build_info()
    assert cpp.unavailable_reason() is None
    assert info["library"].endswith(".so") and "-O3" in info["flags"] and isinstance(info["openmp"], bool)


@pytest.mark.parametrize("uncond,ref,noise", list(itertools.product((False, True), repeat=3)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_guided_step_forward(gen, shape, dtype, uncond, ref, noise):
    inputs = step_inputs(gen, shape, dtype, uncond, ref, noise)
    x_prev, kl = forward(inputs)
    exact_x_prev, exact_kl, _ = reference_step(inputs)
    assert x_prev.dtype == dtype
    assert_matches(x_prev, exact_x_prev, "x_prev")
    assert kl.dtype == compute_dtype(dtype)
    if ref:
        assert_matches(kl, exact_kl, "kl")
    else:
        assert kl.shape == (0,)


@pytest.mark.parametrize("uncond,ref", list(itertools.product((False, True), repeat=2)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_guided_step_backward(gen, shape, dtype, uncond, ref):
    inputs = step_inputs(gen, shape, dtype, uncond, ref, noise=True)
    names = [n for n in ("x", "eps_cond", "eps_uncond", "eps_ref_cond", "eps_ref_uncond", "noise")
             if n == "noise" or inputs[n] is not None]
    ct = compute_dtype(dtype)
    grad_out = randn(gen, shape, dtype)
    grad_kl = torch.randn(shape[0], generator=gen, dtype=F64).to(ct)
    for with_grad, with_grad_kl in itertools.product((False, True), (False, True) if ref else (False,)):
        if not (with_grad or with_grad_kl):
            continue
        x_prev, kl, leaves = reference_step(inputs, names)
        objective = (x_prev * grad_out.double()).sum() if with_grad else 0
        if with_grad_kl:
            objective = objective + (kl * grad_kl.double()).sum()
        exact = dict(zip(names, torch.autograd.grad(objective, [leaves[n] for n in names], allow_unused=True)))
        got = dict(zip(("x", "eps_cond", "eps_uncond", "eps_ref_cond", "eps_ref_uncond", "noise"),
                       backward(inputs, grad_out if with_grad else None, grad_kl if with_grad_kl else None)))
        for name in names:
            expected = exact[name] if exact[name] is not None else torch.zeros(shape, dtype=F64)
            assert got[name].dtype == dtype
            assert_matches(got[name], expected, f"grad {name} (grad_x_prev={with_grad}, grad_kl={with_grad_kl})")
        assert all(got[n] is None for n in got if n not in names)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_guided_step_backward_returns_only_what_is_needed(gen, dtype):
    inputs = step_inputs(gen, (3, 4, 5), dtype, uncond=True, ref=True, noise=True)
    grad_out = randn(gen, (3, 4, 5), dtype)
    grad_kl = torch.rand(3, generator=gen)
    for need in itertools.product((False, True), repeat=4):
        full = backward(inputs, grad_out, grad_kl)
        got = backward(inputs, grad_out, grad_kl, need)
        present = (need[0], need[1], need[1], need[2], need[2], need[3])
        for g, g_full, wanted in zip(got, full, present):
            assert (g is None) == (not wanted)
            if wanted:
                assert torch.equal(g, g_full)


@pytest.mark.parametrize("with_skip,with_out", list(itertools.product((False, True), repeat=2)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_x0_estimate(gen, shape, dtype, with_skip, with_out):
    ct = compute_dtype(dtype)
    x, eps, grad = (randn(gen, shape, dtype) for _ in range(3))
    alpha_t, _ = schedule(gen, shape[0], dtype)
    c_skip = torch.rand(shape[0], generator=gen, dtype=F64).to(ct) if with_skip else None
    c_out = (0.5 + torch.rand(shape[0], generator=gen, dtype=F64)).to(ct) if with_out else None
    x64, eps64 = x.double().requires_grad_(), eps.double().requires_grad_()
    exact = reference.consistency_x0(x64, eps64, alpha_t.double(), 0.0 if c_skip is None else c_skip.double(),
                                     1.0 if c_out is None else c_out.double())
    got = cpp.x0_estimate_forward(x, eps, alpha_t, c_skip, c_out)
    assert got.dtype == dtype
    assert_matches(got, exact, "x0")
    exact_grads = torch.autograd.grad(exact, [x64, eps64], grad.double())
    grads = cpp.x0_estimate_backward(grad, alpha_t, c_skip, c_out, True, True)
    for name, g, e in zip(("x", "eps"), grads, exact_grads):
        assert_matches(g, e, f"grad {name}")
    assert cpp.x0_estimate_backward(grad, alpha_t, c_skip, c_out, False, True)[0] is None
    assert cpp.x0_estimate_backward(grad, alpha_t, c_skip, c_out, True, False)[1] is None


@pytest.mark.parametrize("with_weight", (False, True))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("batch", (1, 5, 33))
def test_sqdf_loss(gen, batch, dtype, with_weight):
    reward, kl, weight = (torch.rand(batch, generator=gen, dtype=F64).to(dtype) for _ in range(3))
    k = torch.randint(0, 20, (batch,), generator=gen).to(dtype)
    weight = weight if with_weight else None
    gamma, alpha = 0.93, 0.3
    leaves = [t.double().requires_grad_() for t in (reward, kl, weight if with_weight else reward)]
    exact = reference.sqdf_loss(leaves[0], leaves[1], k.double(), gamma, alpha, leaves[2] if with_weight else None)
    loss = cpp.sqdf_loss_forward(reward, kl, k, gamma, alpha, weight)
    assert loss.shape == () and loss.dtype == dtype
    assert_matches(loss, exact, "loss")
    grad = torch.tensor(1.7, dtype=dtype)
    exact_grads = torch.autograd.grad(exact, leaves, grad.double(), allow_unused=True)
    grads = cpp.sqdf_loss_backward(grad, reward, kl, k, gamma, alpha, weight, True, True, True)
    assert_matches(grads[0], exact_grads[0], "grad reward")
    assert_matches(grads[1], exact_grads[1], "grad kl")
    if with_weight:
        assert_matches(grads[2], exact_grads[2], "grad weight")
    else:
        assert grads[2] is None
    assert cpp.sqdf_loss_backward(grad, reward, kl, k, gamma, alpha, weight, False, True, False)[::2] == (None, None)


@pytest.mark.parametrize("shape,dtype", [((64, 4, 64, 64), torch.float32), ((5, 3, 100, 70), torch.bfloat16),
                                         ((3, 70001), torch.float64)], ids=str)
def test_results_do_not_depend_on_the_thread_count(gen, two_threads, shape, dtype):
    """Above the parallel threshold (and with a partial last chunk per sample): bitwise equal on 1 and 2 threads,
    and still matching the reference."""
    inputs = step_inputs(gen, shape, dtype, uncond=True, ref=True, noise=True)
    grad_out = randn(gen, shape, dtype)
    grad_kl = torch.randn(shape[0], generator=gen, dtype=F64).to(compute_dtype(dtype))
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        x0 = cpp.x0_estimate_forward(inputs["x"], inputs["eps_cond"], inputs["alpha_t"], None, None)
        results.append([*forward(inputs), *backward(inputs, grad_out, grad_kl), x0])
    for one, two in zip(*results):
        assert torch.equal(one, two)
    torch.set_num_threads(1)  # the float64 reference is the same on any count; a 2-thread team stalls on shared cores
    exact_x_prev, exact_kl, _ = reference_step(inputs)
    assert_matches(results[0][0], exact_x_prev, "x_prev")
    assert_matches(results[0][1], exact_kl, "kl")


def test_launchers_reject_what_would_read_out_of_bounds(gen):
    x = randn(gen, (4, 6), torch.float32)
    alpha_t, alpha_prev = schedule(gen, 4, torch.float32)
    with pytest.raises(ValueError, match="eps_cond must be a contiguous"):
        cpp.guided_step_forward(x, x.t().contiguous().t(), None, None, None, None, alpha_t, alpha_prev, ETA, W)
    with pytest.raises(ValueError, match="alpha_t .*dtype torch.float32, got shape"):
        cpp.x0_estimate_forward(x, x, alpha_t.double(), None, None)
    with pytest.raises(ValueError, match="eps_ref_uncond"):
        cpp.guided_step_forward(x, x, x, x, None, None, alpha_t, alpha_prev, ETA, W)
    # the module's own checks: element count, device, required tensors, tensor type, dtype of x, argument count
    with pytest.raises(ValueError, match="alpha_prev must be a contiguous CPU tensor of 4 elements"):
        cpp.guided_step_forward(x, x, None, None, None, None, alpha_t, alpha_prev[:3], ETA, W)
    with pytest.raises(ValueError, match="noise .*device meta"):
        cpp.guided_step_forward(x, x, None, None, None, x.to("meta"), alpha_t, alpha_prev, ETA, W)
    with pytest.raises(ValueError, match="alpha_t must be a tensor, got None"):
        cpp.guided_step_backward(x, None, x, None, None, None, None, alpha_prev, ETA, W, True, True, True, True)
    with pytest.raises(TypeError, match="eps must be a torch.Tensor, got list"):
        cpp.x0_estimate_forward(x, [1.0], alpha_t, None, None)
    with pytest.raises(ValueError, match="x must be float32/float64/float16/bfloat16"):
        cpp.x0_estimate_forward(x.int(), x.int(), alpha_t, None, None)
    with pytest.raises(ValueError, match="reward must be a non-empty float32/float64"):
        cpp.sqdf_loss_forward(x, x, x, 0.9, 0.5, None)
    with pytest.raises(TypeError, match="takes 5 positional arguments"):
        cpp._module().x0_estimate_forward(x, x, alpha_t, None)
