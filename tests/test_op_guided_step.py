"""The guided DDIM step (`ops.policy_step`, `guided_policy_step`, `rollout_step`; sqdf_fast/ops/guided_step.py) on
every backend x dtype x shape x layout against the float64 reference, to the precision rule of `ops_common`;
gradcheck in float64; bad input. The step against diffusers is in test_step_maths.py.
"""
from __future__ import annotations

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
from sqdf_fast.ops import reference


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
              "wrong length": torch.full((3,), 0.5, dtype=F64)}
    for name in ("alpha_t", "alpha_prev"):
        for label, value in values.items():
            yield pytest.param({name: value}, name, id=f"{name} {label}")


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
