"""The guided DDIM step (`ops.policy_step`, `guided_policy_step`, `rollout_step`; sqdf_fast/ops/guided_step.py) on
every backend x dtype x shape x layout against the float64 reference, to the precision rule of `ops_common`;
gradcheck in float64; bad input. The step against diffusers is in test_step_maths.py.
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


def step_case(gen, shape, dtype, layout, guided: bool, with_ref: bool):
    x, eps_c, eps_u, ref_c, ref_u, noise = (make(gen, shape, dtype, layout) for _ in range(6))
    a, a_prev = schedule_values(shape[0])
    args = dict(x=x, eps_cond=eps_c, eps_uncond=eps_u if guided else None, guidance=3.5 if guided else 1.0,
                alpha_t=a, alpha_prev=a_prev, eta=0.8, noise=noise, eps_ref_cond=ref_c if with_ref else None,
                eps_ref_uncond=ref_u if with_ref and guided else None)
    return args


def run_reference(args: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference in `dtype`: float64 gives the oracle, a low precision gives plain PyTorch's own error."""
    return reference.guided_policy_step(args["x"], args["eps_cond"], args["eps_uncond"], args["guidance"],
                                        args["alpha_t"].to(dtype), args["alpha_prev"].to(dtype), args["eta"],
                                        args["noise"], args["eps_ref_cond"], args["eps_ref_uncond"])


def as_f64(args: dict) -> dict:
    return {k: (v.detach().double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


# forward and backward against the float64 reference ----------------------------------------------------------------
@pytest.mark.parametrize("guided, with_ref", [(False, True), (True, True), (True, False)],
                         ids=["policy", "guided", "guided-no-ref"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_guided_step_forward_backward(backend, gen, dtype, shape, layout, guided, with_ref):
    args = step_case(gen, shape, dtype, layout, guided, with_ref)
    grad_names = [k for k in ("x", "eps_cond", "eps_uncond", "eps_ref_cond", "eps_ref_uncond", "noise")
                  if args[k] is not None]
    for k in grad_names:
        args[k] = args[k].detach().requires_grad_()
    x_prev, kl = ops.guided_policy_step(**args)
    assert x_prev.dtype == dtype and x_prev.shape == shape
    assert (kl is None) == (not with_ref)

    exact_args = as_f64(args)
    for k in grad_names:
        exact_args[k].requires_grad_()
    exact_x_prev, exact_kl = run_reference(exact_args, F64)
    plain_args = {k: (v.detach().requires_grad_() if k in grad_names else v) for k, v in args.items()}
    plain_x_prev, plain_kl = run_reference(plain_args, dtype)
    assert_precision("x_prev", x_prev, exact_x_prev, plain_x_prev, dtype)
    if with_ref:
        assert kl.dtype == (F64 if dtype == F64 else torch.float32) and kl.shape == (shape[0],)
        assert_precision("kl", kl, exact_kl, plain_kl, dtype)

    # backward with both outputs used
    g_x = make(gen, shape, dtype)
    g_kl = torch.rand(shape[0], generator=gen, dtype=F64)

    def loss(out, kl_out):
        total = (out * g_x.to(out.dtype)).sum()
        return total + (kl_out * g_kl.to(kl_out.dtype)).sum() if kl_out is not None else total

    grads = torch.autograd.grad(loss(x_prev, kl), [args[k] for k in grad_names])
    exact = torch.autograd.grad(loss(exact_x_prev, exact_kl), [exact_args[k] for k in grad_names])
    plain = torch.autograd.grad(loss(plain_x_prev, plain_kl), [plain_args[k] for k in grad_names])
    for name, got, e, p in zip(grad_names, grads, exact, plain):
        assert got.dtype == dtype and got.shape == shape
        assert_precision(f"grad {name}", got, e, p, dtype)


# gradcheck in float64 through the fused autograd ----------------------------------------------------------------
def test_gradcheck_guided_step(backend, gen):
    # gradcheck perturbs every input element twice, each perturbation an (interpreted, for triton) launch: the
    # smallest shape that still has per-sample schedule values (B = 2) and several elements per sample (D = 3).
    # The fused kernels' tiling (one and several tiles per sample) is checked against the float64 reference's
    # autograd in test_guided_step_forward_backward.
    shape = (2, 3)
    a, a_prev = schedule_values(2)
    tensors = [make(gen, shape, F64).requires_grad_() for _ in range(6)]

    def step(x, eps_c, eps_u, ref_c, ref_u, noise):
        return ops.guided_policy_step(x, eps_c, eps_u, 2.5, a, a_prev, 0.9, noise, ref_c, ref_u)

    assert torch.autograd.gradcheck(step, tensors)
    # policy_step with a reference, the noise held fixed
    x, eps, eps_ref, noise = tensors[0], tensors[1], tensors[3], tensors[5].detach()
    assert torch.autograd.gradcheck(lambda *v: ops.policy_step(v[0], v[1], a, a_prev, 0.7, noise, v[2]),
                                    (x, eps, eps_ref))
    # no reference and no noise gradient needed; eta = 0 (sigma = 0) must not produce NaN through the KL branch
    assert torch.autograd.gradcheck(lambda x, eps: ops.policy_step(x, eps, a, a_prev, 0.0, noise)[0], (x, eps))


# rollout step -------------------------------------------------------------------------------------------------------
def test_rollout_step_is_the_step_without_autograd_and_kl_in_nats(backend, gen):
    args = step_case(gen, (3, 4, 5), torch.float32, "contiguous", True, True)
    args["x"].requires_grad_()
    x_prev, kl_nats = ops.rollout_step(**args)
    assert not x_prev.requires_grad
    step_x_prev, kl = ops.guided_policy_step(**args)
    torch.testing.assert_close(x_prev, step_x_prev.detach())
    torch.testing.assert_close(kl_nats, kl.detach() * 20 / 2)   # kl = (2 / d) KL_true, d = 20


# bad input on every backend: ValueError naming the argument, before any work ---------------------------------------
def _bad_alphas():
    values = {"0": 0.0, "1.5": 1.5, "negative": -0.2, "cpu tensor with 0": torch.tensor([0.5, 0.0], dtype=F64),
              "wrong length": torch.full((3,), 0.5, dtype=F64), "NaN": torch.tensor([0.5, math.nan], dtype=F64)}
    for name in ("alpha_t", "alpha_prev"):
        for label, value in values.items():
            yield pytest.param({name: value}, name, id=f"{name} {label}")
    # the domain's order (docs/ops.md §5): a step removes noise; the error names alpha_prev
    order = "^alpha_prev must be >= alpha_t"
    yield pytest.param(dict(alpha_t=0.6, alpha_prev=0.5), order, id="alpha_prev < alpha_t floats")
    yield pytest.param(dict(alpha_t=torch.tensor([0.3, 0.6], dtype=F64), alpha_prev=torch.tensor([0.4, 0.5])),
                       order, id="alpha_prev < alpha_t in one sample")
    yield pytest.param(dict(alpha_t=torch.tensor(0.55), alpha_prev=torch.tensor([0.6, 0.5], dtype=F64)), order,
                       id="alpha_prev < alpha_t scalar tensor")
    # sigma = 0 with a reference: the step to alpha_prev = 1 is deterministic and the KL divides by sigma^2
    yield pytest.param(dict(alpha_prev=1.0), "^alpha_prev must be < 1", id="alpha_prev 1 with eps_ref")
    yield pytest.param(dict(alpha_t=torch.tensor([0.5, 1.0]), alpha_prev=torch.tensor([1.0, 1.0])),
                       "^alpha_prev must be < 1", id="alpha_prev 1 with eps_ref in one sample")
    # eta > 1 where sigma^2 > 1 - alpha_prev: sqrt(1 - alpha_prev - sigma^2) is not real
    yield pytest.param(dict(alpha_t=0.01, alpha_prev=0.1, eta=1.2), "^eta = 1.2 gives sigma", id="eta 1.2 too big")


@pytest.mark.parametrize("override, match", [
    pytest.param(dict(eps=zeros(2, 4, dtype=F64)), "^eps has shape", id="eps shape"),
    pytest.param(dict(noise=zeros(3, 3, dtype=F64)), "^noise has shape", id="noise shape"),
    pytest.param(dict(eps_ref=zeros(2, 3, 1, dtype=F64)), "^eps_ref has shape", id="eps_ref shape"),
    pytest.param(dict(eps=zeros(2, 3, dtype=torch.float32)), "^eps has dtype", id="eps dtype"),
    pytest.param(dict(noise=zeros(2, 3, dtype=torch.float32)), "^noise has dtype", id="noise dtype"),
    pytest.param(dict(eps_ref=zeros(2, 3, dtype=torch.float32)), "^eps_ref has dtype", id="eps_ref dtype"),
    *_bad_alphas(),
    pytest.param(dict(eta=0.0), "eta", id="eta=0 with eps_ref"),
    pytest.param(dict(eta=-0.1, eps_ref=None), "eta", id="negative eta"),
])
def test_policy_step_rejects_bad_input(backend, override, match):
    args = dict(x=zeros(2, 3, dtype=F64), eps=zeros(2, 3, dtype=F64), alpha_t=0.5, alpha_prev=0.6, eta=0.5,
                noise=zeros(2, 3, dtype=F64), eps_ref=zeros(2, 3, dtype=F64))
    with pytest.raises(ValueError, match=match):
        ops.policy_step(**{**args, **override})


@pytest.mark.parametrize("override, match", [
    pytest.param(dict(eps_uncond=zeros(2, 4)), "^eps_uncond has shape", id="eps_uncond shape"),
    pytest.param(dict(eps_ref_uncond=zeros(2, 3, dtype=F64)), "^eps_ref_uncond has dtype", id="eps_ref_uncond dtype"),
    pytest.param(dict(eps_cond=zeros(2, 3, dtype=torch.int32)), "^eps_cond must be a floating", id="integer eps"),
    pytest.param(dict(eps_ref_uncond=None), "eps_uncond and eps_ref_uncond", id="unguided reference"),
    pytest.param(dict(guidance="3"), "^guidance", id="guidance type"),
    pytest.param(dict(alpha_t=torch.full((2,), 0.5, device="meta")), "^alpha_t is on meta", id="alpha_t device"),
    pytest.param(dict(eta=0.0), "^eta must be > 0", id="eta 0 with reference"),
])
def test_guided_step_rejects_bad_input(backend, override, match):
    args = dict(x=zeros(2, 3), eps_cond=zeros(2, 3), eps_uncond=zeros(2, 3), guidance=2.0, alpha_t=0.5,
                alpha_prev=0.6, eta=1.0, noise=zeros(2, 3), eps_ref_cond=zeros(2, 3), eps_ref_uncond=zeros(2, 3))
    with pytest.raises(ValueError, match=match):
        ops.guided_policy_step(**{**args, **override})


@pytest.mark.parametrize("alpha_t, alpha_prev, eta", [(0.5, 0.6, 1.2), (0.01, 0.1, 1.0), (0.3, 0.3, 1.0),
                                                      (1.0, 1.0, 0.5), (2.0 ** -149, 0.5, 1.0)])
def test_policy_step_accepts_the_domain(backend, alpha_t, alpha_prev, eta):
    """Inside the domain: eta > 1 where sigma^2 <= 1 - alpha_prev, equal alphas (the identity, also at the clean
    end), the smallest float32 alpha."""
    x = zeros(2, 3)
    _, kl = ops.policy_step(x, x, alpha_t, alpha_prev, eta, x, x)
    assert torch.isfinite(kl).all()


def test_alphas_are_checked_as_the_kernels_read_them(backend):
    """A positive float64 alpha that float32 rounds to 0 is rejected for float32 inputs, accepted for float64."""
    x = zeros(2, 3)
    for value in (1e-50, torch.tensor([1e-50, 0.5], dtype=F64)):
        with pytest.raises(ValueError, match="^alpha_t must lie in"):
            ops.policy_step(x, x, value, 0.6, 1.0, x)
        ops.policy_step(x.double(), x.double(), value, 0.6, 1.0, x.double())


# the domain's edges (docs/ops.md §5) ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equal_alphas_are_the_identity_step(backend, gen, dtype):
    """alpha_t = alpha_prev (the clean end 1 = 1 included): x_prev = x exactly, kl = 0, and the gradients are those
    of the identity, the limits as alpha_prev -> alpha_t. The step maths gives 0 / 0 there without the rule."""
    shape = (3, 2, 5)
    a = torch.tensor([0.3, 1.0, 0.999], dtype=F64)
    x, eps, ref, noise = (make(gen, shape, dtype).requires_grad_() for _ in range(4))
    x_prev, kl = ops.policy_step(x, eps, a, a, 0.7, noise, ref)
    assert torch.equal(x_prev, x) and torch.equal(kl, torch.zeros_like(kl))
    g = make(gen, shape, dtype)
    grads = torch.autograd.grad((x_prev * g).sum() + kl.sum(), (x, eps, ref, noise))
    for got, want in zip(grads, (g, zeros(*shape, dtype=dtype), zeros(*shape, dtype=dtype),
                                 zeros(*shape, dtype=dtype))):
        assert torch.equal(got, want)
    # the limit: a step to alpha_prev slightly above alpha_t is close to the identity, its KL close to 0
    x_near, kl_near = ops.policy_step(x.detach().double(), eps.detach().double(), a, a * (1 - 1e-9) + 1e-9, 0.7,
                                      noise.detach().double(), ref.detach().double())
    torch.testing.assert_close(x_near, x.detach().double(), rtol=0, atol=1e-3)
    assert bool((kl_near < 1e-6).all())


def test_step_to_alpha_one_without_reference(backend, gen):
    """alpha_prev = 1 (diffusers' set_alpha_to_one): sigma = 0, the step lands on Tweedie's x0 whatever eta."""
    x, eps, noise = (make(gen, (2, 3, 4), F64) for _ in range(3))
    a = torch.tensor([0.2, 0.9], dtype=F64)
    x_prev, kl = ops.policy_step(x, eps, a, 1.0, 0.8, noise)
    assert kl is None
    torch.testing.assert_close(x_prev, reference.tweedie_x0(x, eps, a), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_schedule_is_finite_and_accurate(backend, gen, dtype):
    """a = 3.8e-5 to a' = 0.99982 at eta 1: 1 - a' - sigma^2 (1.2e-12) cancels to below 0 in float32 (NaN before the
    coefficients were computed in float64 without cancellation); every backend now agrees with float64."""
    args = step_case(gen, (2, 3, 8), dtype, "contiguous", True, True)
    args.update(alpha_t=torch.tensor([3.8e-5, 3.8e-5]), alpha_prev=torch.tensor([0.99982, 0.99982]), eta=1.0)
    x_prev, kl = ops.guided_policy_step(**args)
    assert torch.isfinite(x_prev).all() and torch.isfinite(kl).all()
    exact_x_prev, exact_kl = run_reference(as_f64(args), F64)
    plain_x_prev, _ = run_reference(args, dtype)
    _, plain_kl = run_reference({k: (v.to(kl.dtype) if isinstance(v, torch.Tensor) else v) for k, v in args.items()},
                                kl.dtype)
    assert_precision("x_prev", x_prev, exact_x_prev, plain_x_prev, dtype)
    assert_precision("kl", kl, exact_kl, plain_kl, kl.dtype)


def test_samples_with_no_elements(backend):
    """D = 0: x_prev is empty and the KL is 0 (nothing differs; the C++ backend used to return uninitialised memory,
    the reference NaN, Triton raised); the rollout's KL in nats too; backward runs."""
    x = zeros(3, 2, 0).requires_grad_()
    x_prev, kl = ops.policy_step(x, x, torch.tensor([0.2, 0.5, 0.7]), 0.8, 1.0, x, x)
    assert x_prev.shape == (3, 2, 0) and torch.equal(kl, torch.zeros(3))
    assert torch.equal(ops.rollout_step(x, x, None, 1.0, 0.2, 0.8, 1.0, x, x)[1], torch.zeros(3))
    (grad,) = torch.autograd.grad(x_prev.sum() + kl.sum(), x)
    assert grad.shape == x.shape


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_torch_backend_computes_16_bit_inputs_in_float32(gen, dtype):
    """The reference backend upcasts 16-bit inputs and rounds its results back, as the fused backends: in float16 /
    bfloat16 arithmetic alphas near 1 round to 1 and the KL was off by up to 1000% or not finite."""
    args = step_case(gen, (4, 3, 16), dtype, "contiguous", True, True)
    args.update(alpha_t=torch.tensor([0.9990, 0.9993, 0.5, 0.01]), alpha_prev=torch.tensor([0.9995, 0.9996, 0.6, 0.4]))
    with ops.use_backend("torch"):
        x_prev, kl = ops.guided_policy_step(**args)
    assert x_prev.dtype == dtype and kl.dtype == torch.float32
    exact_x_prev, exact_kl = run_reference(as_f64(args), F64)
    torch.testing.assert_close(kl.double(), exact_kl, rtol=1e-5, atol=0)
    # one rounding to the 16-bit dtype (half an ulp), plus float32 arithmetic
    ulp = torch.finfo(dtype).eps * exact_x_prev.abs().clamp_min(torch.finfo(dtype).tiny)
    assert bool(((x_prev.double() - exact_x_prev).abs() <= ulp / 2 + 1e-5 * exact_x_prev.abs().max()).all())


def _launchers(name: str):
    if name == "torch":
        return None
    try:
        return dispatch.launchers(name)
    except Exception as err:  # noqa: BLE001 -- a backend that cannot load here
        pytest.skip(f"{name} launchers unavailable: {err}")


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("name", ("torch", "cpp", "triton"))
def test_outside_the_domain_every_backend_gives_nan(name, gen):
    """What reaches a kernel unchecked (device tensors are not read: docs/ops.md §5): a sample outside the domain
    gets NaN in x_prev and kl, the same on every backend; the others are unaffected. Called below the checks."""
    if name == "triton" and dispatch.triton_status("cpu")[0] is False:
        pytest.skip("triton not in interpreter mode")
    launch = _launchers(name)
    #           ok    a > a'  a = 0  a' > 1  a = a'  a' = 1 (kl only)  eta = 1.2 too big
    a = torch.tensor([0.3, 0.6, 0.0, 0.5, 0.4, 0.5, 0.01])
    ap = torch.tensor([0.5, 0.5, 0.5, 1.5, 0.4, 1.0, 0.1])
    x, eps, ref, noise = (make(gen, (7, 5), torch.float32) for _ in range(4))
    results = []
    for eta in (1.0, 1.2):
        if launch is None:
            x_prev, kl = reference.guided_policy_step(x, eps, None, 1.0, a, ap, eta, noise, ref)
        else:
            x_prev, kl = launch.guided_step_forward(x, eps, None, ref, None, noise, a, ap, eta, 1.0)
        results.append((x_prev, kl))
    x_prev, kl = results[0]
    nan_rows = torch.tensor([False, True, True, True, False, False, False])
    assert bool(x_prev[nan_rows].isnan().all()) and bool(x_prev[~nan_rows].isfinite().all())
    assert kl.isnan().tolist() == [False, True, True, True, False, True, False]
    assert kl[4] == 0
    x_prev, kl = results[1]   # at eta = 1.2 the last sample leaves the domain (sigma^2 > 1 - alpha_prev)
    assert bool(x_prev[6].isnan().all()) and bool(kl[6].isnan()) and bool(x_prev[0].isfinite().all())
