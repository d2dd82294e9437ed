"""Every op backend (torch reference, C++, Triton in interpreter mode) against the float64 reference.

Precision rule (flash-attention's): in a low precision, a backend's error against the float64 reference of the same
rounded inputs is at most twice the error of plain PyTorch computing the reference in that precision, plus a floor
of a fraction of an ulp of the output dtype (the fused backends compute in fp32, so they usually beat the rule).
"""
from __future__ import annotations

import math

import pytest
import torch

from sqdf_fast import ops
from sqdf_fast.ops import dispatch, reference

F64 = torch.float64
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# floor of the 2x rule, relative to the output's magnitude: a fraction of one ulp of the dtype
FLOOR = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}
SHAPES = [(2, 4, 64, 64), (1, 3, 7, 5), (33, 5), (7,), (3, 5, 6)]
LAYOUTS = ("contiguous", "transposed")


def make(gen: torch.Generator, shape: tuple, dtype: torch.dtype, layout: str = "contiguous") -> torch.Tensor:
    """A random tensor rounded to dtype; 'transposed' gives a non-contiguous view of the same shape."""
    if layout == "transposed" and len(shape) >= 3:
        return torch.randn(shape[0], *shape[:0:-1], generator=gen, dtype=F64).to(dtype).transpose(1, -1)
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype)


def schedule_values(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cumulative alphas spanning the whole chain (nearly pure noise to nearly clean)."""
    a_prev = torch.linspace(0.05, 0.995, batch, dtype=F64) if batch > 1 else torch.tensor([0.6], dtype=F64)
    return a_prev * torch.linspace(0.3, 0.99, batch, dtype=F64).flip(0)[:batch], a_prev


def assert_precision(name: str, got: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype):
    err = (got.double() - exact).abs().max().item()
    plain_err = (plain.double() - exact).abs().max().item()
    bound = 2 * plain_err + FLOOR[dtype] * (1 + exact.abs().max().item())
    assert err <= bound, f"{name}: error {err:.3g} > 2 x plain PyTorch's {plain_err:.3g} + floor ({dtype})"


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
    """The fused backends compute in fp32 and round once: x0 with c_skip = s and c_out = 0 is s * x, so every
    16-bit value must survive s = 1 bitwise (NaN stays NaN), and any product must round exactly as torch rounds it
    (ties to even, overflow to inf, gradual underflow). The Triton interpreter truncates to bf16, so this also
    checks the kernels' explicit rounding there."""
    if backend == "torch":
        pytest.skip("the reference computes in the input dtype")
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


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("batch", [1, 33])
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_sqdf_loss_forward_backward(backend, gen, dtype, batch, weighted):
    reward, kl = (torch.randn(batch, generator=gen, dtype=dtype).requires_grad_() for _ in range(2))
    weight = torch.rand(batch, generator=gen, dtype=dtype).requires_grad_() if weighted else None
    k = torch.randint(0, 20, (batch,), generator=gen)
    inputs = [reward, kl] + ([weight] if weighted else [])
    got = ops.sqdf_loss(reward, kl, k, 0.9, 0.7, weight)
    exact_inputs = [v.detach().double().requires_grad_() for v in inputs]
    exact = reference.sqdf_loss(exact_inputs[0], exact_inputs[1], k, 0.9, 0.7, exact_inputs[2] if weighted else None)
    assert got.shape == () and got.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), exact, **tol)
    for g, e in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(exact, exact_inputs)):
        torch.testing.assert_close(g.double(), e, **tol)


# gradcheck in float64 through the registered autograd ----------------------------------------------------------------
def test_gradcheck_guided_step(backend, gen):
    shape = (3, 2, 5)
    a, a_prev = schedule_values(3)
    tensors = [make(gen, shape, F64).requires_grad_() for _ in range(6)]

    def step(x, eps_c, eps_u, ref_c, ref_u, noise):
        return ops.guided_policy_step(x, eps_c, eps_u, 2.5, a, a_prev, 0.9, noise, ref_c, ref_u)

    assert torch.autograd.gradcheck(step, tensors)
    # no reference and no noise gradient needed; eta = 0 (sigma = 0) must not produce NaN through the KL branch
    x, eps = tensors[:2]
    assert torch.autograd.gradcheck(lambda x, eps: ops.policy_step(x, eps, a, a_prev, 0.0, tensors[5].detach())[0],
                                    (x, eps))


def test_gradcheck_consistency_x0(backend, gen):
    a, _ = schedule_values(4)
    c_skip, c_out = torch.rand(4, generator=gen, dtype=F64), torch.rand(4, generator=gen, dtype=F64)
    x, eps = (make(gen, (4, 3), F64).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(lambda x, eps: ops.consistency_x0(x, eps, a, c_skip, c_out), (x, eps))


def test_gradcheck_sqdf_loss_weight(backend, gen):
    reward, kl, weight = (torch.randn(5, generator=gen, dtype=F64).requires_grad_() for _ in range(3))
    k = torch.tensor([4, 3, 2, 1, 0])
    assert torch.autograd.gradcheck(lambda r, kl, w: ops.sqdf_loss(r, kl, k, 0.8, 0.3, w), (reward, kl, weight))


# the custom ops themselves ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_custom_op_registration(gen, name):
    """torch.library.opcheck: schema, fake (meta) kernels and autograd registration are consistent."""
    with ops.use_backend(name):
        try:
            ops.backend_for("cpu")
        except ValueError as err:
            pytest.skip(str(err))
    shape, (a, a_prev) = (3, 4, 5), schedule_values(3)
    a, a_prev = a.float(), a_prev.float()
    x, eps_c, eps_u, ref_c, ref_u, noise = (make(gen, shape, torch.float32).requires_grad_() for _ in range(6))
    sqdf = torch.ops.sqdf
    torch.library.opcheck(sqdf.guided_step, (x, eps_c, eps_u, ref_c, ref_u, noise, a, a_prev, 0.7, 2.0, name))
    torch.library.opcheck(sqdf.guided_step, (x, eps_c, None, None, None, None, a, a_prev, 0.7, 1.0, name))
    torch.library.opcheck(sqdf.x0_estimate, (x, eps_c, a, a_prev, a, name))
    reward, kl = (torch.randn(3, generator=gen).requires_grad_() for _ in range(2))
    torch.library.opcheck(sqdf.sqdf_loss, (reward, kl, torch.tensor([2.0, 1.0, 0.0]), 0.9, 0.5, None, name))


def test_ops_compile_without_graph_breaks(backend, gen):
    """The public ops trace into one graph (custom ops are opaque to dynamo); the eager backend keeps it fast."""
    if backend == "triton":
        pytest.skip("interpreted Triton launches cannot run inside torch.compile on the CPU (environment.md)")
    a, a_prev = (v.float() for v in schedule_values(4))
    x, eps, eps_ref, noise = (make(gen, (4, 6), torch.float32) for _ in range(4))
    k = torch.tensor([3, 2, 1, 0])

    def train_step(x, eps, eps_ref, noise):
        x_prev, kl = ops.policy_step(x, eps, a, a_prev, 1.0, noise, eps_ref)
        x0 = ops.tweedie_x0(x_prev, eps, a_prev)
        return ops.sqdf_loss(x0.mean(1), kl, k, 0.9, 0.5)

    torch._dynamo.reset()
    compiled = torch.compile(train_step, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, eps, eps_ref, noise), train_step(x, eps, eps_ref, noise))


# rollout step -------------------------------------------------------------------------------------------------------
def test_rollout_step_is_the_step_without_autograd_and_kl_in_nats(backend, gen):
    args = step_case(gen, (3, 4, 5), torch.float32, "contiguous", True, True)
    args["x"].requires_grad_()
    x_prev, kl_nats = ops.rollout_step(**args)
    assert not x_prev.requires_grad
    step_x_prev, kl = ops.guided_policy_step(**args)
    torch.testing.assert_close(x_prev, step_x_prev.detach())
    torch.testing.assert_close(kl_nats, kl.detach() * 20 / 2)   # kl = (2 / d) KL_true, d = 20


# dispatch -----------------------------------------------------------------------------------------------------------
def test_dispatch_choice_and_overrides(monkeypatch):
    monkeypatch.delenv("SQDF_KERNELS", raising=False)
    assert ops.backend_for("cpu")[0] in ("cpp", "torch")
    assert ops.backend_for("meta")[0] == "torch"
    monkeypatch.setenv("SQDF_KERNELS", "torch")
    assert ops.backend_for("cpu") == ("torch", "requested by SQDF_KERNELS")
    with ops.use_backend("auto"):       # auto leaves the environment's choice in force
        assert ops.backend_for("cpu")[0] == "torch"
    monkeypatch.setenv("SQDF_KERNELS", "cuda")
    with pytest.raises(ValueError, match="^SQDF_KERNELS='cuda': must be one of"):
        ops.backend_for("cpu")
    with pytest.raises(ValueError, match="^kernels='fast'"):
        with ops.use_backend("fast"):
            pass


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    with ops.use_backend("cpp"), pytest.raises(ValueError, match="^kernels=cpp: the C\\+\\+ backend runs CPU"):
        ops.backend_for("meta")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with ops.use_backend("triton"), pytest.raises(ValueError, match="^kernels=triton"):
        ops.backend_for("cpu")


def test_forced_backend_runs_what_was_asked(monkeypatch, gen):
    """SQDF_KERNELS=torch really runs the reference: the C++ and Triton ops are never called."""
    calls = []
    monkeypatch.setattr(dispatch, "launchers", lambda name: calls.append(name))
    monkeypatch.setenv("SQDF_KERNELS", "torch")
    x = make(gen, (2, 3), torch.float32)
    ops.policy_step(x, x, 0.5, 0.6, 1.0, x)
    ops.tweedie_x0(x, x, 0.5)
    ops.sqdf_loss(x[:, 0], x[:, 1], torch.arange(2), 0.9, 0.1)
    assert calls == []


# bad input on every backend -----------------------------------------------------------------------------------------
def _z(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


@pytest.mark.parametrize("override, match", [
    pytest.param(dict(eps_uncond=_z(2, 4)), "^eps_uncond has shape", id="eps_uncond shape"),
    pytest.param(dict(eps_ref_uncond=_z(2, 3, dtype=F64)), "^eps_ref_uncond has dtype", id="eps_ref_uncond dtype"),
    pytest.param(dict(eps_cond=_z(2, 3, dtype=torch.int32)), "^eps_cond must be a floating", id="integer eps"),
    pytest.param(dict(eps_ref_uncond=None), "eps_uncond and eps_ref_uncond", id="unguided reference"),
    pytest.param(dict(guidance="3"), "^guidance", id="guidance type"),
    pytest.param(dict(alpha_t=torch.full((2,), 0.5, device="meta")), "^alpha_t is on meta", id="alpha_t device"),
    pytest.param(dict(eta=0.0), "^eta must be > 0", id="eta 0 with reference"),
])
def test_guided_step_rejects_bad_input(backend, override, match):
    args = dict(x=_z(2, 3), eps_cond=_z(2, 3), eps_uncond=_z(2, 3), guidance=2.0, alpha_t=0.5, alpha_prev=0.6,
                eta=1.0, noise=_z(2, 3), eps_ref_cond=_z(2, 3), eps_ref_uncond=_z(2, 3))
    with pytest.raises(ValueError, match=match):
        ops.guided_policy_step(**{**args, **override})


def test_x_with_empty_batch_is_rejected(backend):
    with pytest.raises(ValueError, match="^x must have a non-empty batch"):
        ops.tweedie_x0(_z(0, 3), _z(0, 3), 0.5)
