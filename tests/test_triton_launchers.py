"""The Triton launchers (sqdf_fast.kernels) against the float64 torch reference, forward and backward.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before triton
is imported). Precision: float64 to ~1e-12, float32 to ~1e-5; bfloat16 / float16 outputs at most one ulp of their
dtype from the exact value rounded to that dtype (plus the float32 compute error of the largest terms).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The Triton kernels ignore torch's thread count; torch's own work here (the float64 references and the comparisons)
# is too small for intra-op threads, which only spin and stall when the cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and triton not in interpreter mode", allow_module_level=True)

from sqdf_fast import kernels  # noqa: E402
from sqdf_fast.ops import reference  # noqa: E402

F64 = torch.float64
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(2, 4, 8, 8), (1, 3, 7, 5), (33, 5), (3,)]
ETA, W = 0.8, 3.5


def ct(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else torch.float32


def rand(gen: torch.Generator, shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype).to(DEVICE)


def schedule(batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, alpha_prev) spanning the chain, alpha_prev > alpha_t, in the compute dtype of `dtype`."""
    a_prev = torch.linspace(0.1, 0.99, batch, dtype=F64) if batch > 1 else torch.tensor([0.6], dtype=F64)
    alpha_t = a_prev * torch.linspace(0.95, 0.4, batch, dtype=F64)
    return alpha_t.to(ct(dtype)).to(DEVICE), a_prev.to(ct(dtype)).to(DEVICE)


def exact(t: torch.Tensor | None) -> torch.Tensor | None:
    """A launcher input as a float64 leaf of the reference (exact: every dtype widens losslessly)."""
    return None if t is None else t.detach().double().requires_grad_()


def assert_matches(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.device.type == DEVICE and got.shape == want.shape, name
    want = want.detach().to(got.device)
    scale = want.abs().max().item() if want.numel() else 0.0
    if got.dtype in (F64, torch.float32):
        tol = 1e-12 if got.dtype == F64 else 1e-5
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale, msg=name)
        return
    # Low precision: one ulp of the dtype around the correctly rounded value, plus float32 error of the terms.
    rounded = want.to(got.dtype).double()
    info = torch.finfo(got.dtype)
    ulp = torch.ldexp(torch.full_like(rounded, info.eps), torch.frexp(rounded).exponent - 1)
    ulp = torch.where(rounded == 0, info.tiny * info.eps, ulp.clamp_min(info.tiny * info.eps))
    err = (got.double() - rounded).abs()
    bad = err > ulp + 2.0**-20 * scale
    assert not bad.any(), f"{name}: {int(bad.sum())} elements off by more than one ulp of {got.dtype}"


# --- guided DDIM step --------------------------------------------------------------------------------------------
def step_inputs(gen, shape, dtype, guided: bool, with_ref: bool, with_noise: bool) -> dict:
    x, eps_c, eps_u, ref_c, ref_u, noise = (rand(gen, shape, dtype) for _ in range(6))
    alpha_t, alpha_prev = schedule(shape[0], dtype)
    return dict(x=x, eps_cond=eps_c, eps_uncond=eps_u if guided else None,
                eps_ref_cond=ref_c if with_ref else None, eps_ref_uncond=ref_u if with_ref and guided else None,
                noise=noise if with_noise else None, alpha_t=alpha_t, alpha_prev=alpha_prev)


def step_reference(inp: dict) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
    leaves = {name: exact(t) for name, t in inp.items() if name not in ("alpha_t", "alpha_prev")}
    if leaves["noise"] is None:  # zero noise, whose gradient the backward still returns when asked
        leaves["noise"] = exact(torch.zeros_like(inp["x"]))
    x_prev, kl = reference.guided_policy_step(
        leaves["x"], leaves["eps_cond"], leaves["eps_uncond"], W, inp["alpha_t"].double(),
        inp["alpha_prev"].double(), ETA, leaves["noise"], leaves["eps_ref_cond"], leaves["eps_ref_uncond"])
    return leaves, x_prev, kl


def launch_forward(inp: dict):
    return kernels.guided_step_forward(inp["x"], inp["eps_cond"], inp["eps_uncond"], inp["eps_ref_cond"],
                                       inp["eps_ref_uncond"], inp["noise"], inp["alpha_t"], inp["alpha_prev"], ETA, W)


def launch_backward(inp: dict, grad_x_prev, grad_kl, need_x=True, need_eps=True, need_ref=True, need_noise=True):
    return kernels.guided_step_backward(grad_x_prev, grad_kl, inp["eps_cond"], inp["eps_uncond"],
                                        inp["eps_ref_cond"], inp["eps_ref_uncond"], inp["alpha_t"],
                                        inp["alpha_prev"], ETA, W, need_x, need_eps, need_ref, need_noise)


GRAD_NAMES = ("x", "eps_cond", "eps_uncond", "eps_ref_cond", "eps_ref_uncond", "noise")


def check_backward(inp, leaves, x_prev_ref, kl_ref, grads, grad_x_prev, grad_kl, needed: set[str]) -> None:
    outputs, grad_outputs = [], []
    if grad_x_prev is not None:
        outputs.append(x_prev_ref), grad_outputs.append(grad_x_prev.double())
    if grad_kl is not None and kl_ref is not None:
        outputs.append(kl_ref), grad_outputs.append(grad_kl.double())
    names = [n for n in GRAD_NAMES if leaves[n] is not None]
    want = torch.autograd.grad(outputs, [leaves[n] for n in names], grad_outputs, allow_unused=True)
    want = dict(zip(names, want))
    for name, got in zip(GRAD_NAMES, grads):
        if name not in needed or leaves[name] is None:
            assert got is None, f"grad_{name} should be None"
            continue
        assert got is not None and got.dtype == inp["x"].dtype, f"grad_{name}"
        assert_matches(got, torch.zeros_like(leaves[name]) if want[name] is None else want[name], f"grad_{name}")


@pytest.mark.parametrize("guided, with_ref, with_noise",
                         [(g, r, n) for g in (False, True) for r in (False, True) for n in (False, True)],
                         ids=lambda v: str(int(v)))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_guided_step(dtype, shape, guided, with_ref, with_noise):
    gen = torch.Generator().manual_seed(1)
    inp = step_inputs(gen, shape, dtype, guided, with_ref, with_noise)
    x_prev, kl = launch_forward(inp)
    leaves, x_prev_ref, kl_ref = step_reference(inp)
    assert x_prev.dtype == dtype and kl.dtype == ct(dtype)
    assert_matches(x_prev, x_prev_ref, "x_prev")
    if with_ref:
        assert_matches(kl, kl_ref, "kl")
    else:
        assert kl.shape == (0,) and kl.device.type == DEVICE

    grad_x_prev, grad_kl = rand(gen, shape, dtype), rand(gen, shape[:1], ct(dtype))
    grads = launch_backward(inp, grad_x_prev, grad_kl)
    check_backward(inp, leaves, x_prev_ref, kl_ref, grads, grad_x_prev, grad_kl, set(GRAD_NAMES))


@pytest.mark.parametrize("has_grad_x_prev, has_grad_kl, needed", [
    (True, False, {"x", "eps_cond", "eps_uncond", "eps_ref_cond", "eps_ref_uncond", "noise"}),
    (False, True, {"x", "eps_cond", "eps_uncond", "eps_ref_cond", "eps_ref_uncond", "noise"}),
    (True, True, {"eps_cond", "eps_uncond"}),
    (True, True, {"eps_ref_cond", "eps_ref_uncond"}),
    (True, True, {"x", "noise"}),
    (True, True, set()),
], ids=["no-grad-kl", "no-grad-x-prev", "eps-only", "ref-only", "x-noise-only", "nothing"])
@pytest.mark.parametrize("dtype", (torch.float64, torch.bfloat16), ids=str)
def test_guided_step_backward_partial(dtype, has_grad_x_prev, has_grad_kl, needed):
    gen = torch.Generator().manual_seed(2)
    shape = (2, 4, 8, 8)
    inp = step_inputs(gen, shape, dtype, guided=True, with_ref=True, with_noise=True)
    leaves, x_prev_ref, kl_ref = step_reference(inp)
    grad_x_prev = rand(gen, shape, dtype) if has_grad_x_prev else None
    grad_kl = rand(gen, shape[:1], ct(dtype)) if has_grad_kl else None
    need_eps, need_ref = "eps_cond" in needed, "eps_ref_cond" in needed
    grads = launch_backward(inp, grad_x_prev, grad_kl, "x" in needed, need_eps, need_ref, "noise" in needed)
    check_backward(inp, leaves, x_prev_ref, kl_ref, grads, grad_x_prev, grad_kl, needed)


def test_guided_step_rejects_unpaired_reference_guidance():
    gen = torch.Generator().manual_seed(3)
    inp = step_inputs(gen, (2, 3), torch.float32, guided=True, with_ref=True, with_noise=False)
    inp["eps_ref_uncond"] = None
    with pytest.raises(ValueError, match="eps_ref_uncond"):
        launch_forward(inp)


# --- x0 estimate ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_skip, with_out", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["tweedie", "skip", "out", "skip-out"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_x0_estimate(dtype, shape, with_skip, with_out):
    gen = torch.Generator().manual_seed(4)
    x, eps, grad = (rand(gen, shape, dtype) for _ in range(3))
    alpha_t, _ = schedule(shape[0], dtype)
    c_skip = torch.rand(shape[0], generator=gen, dtype=F64).to(ct(dtype)).to(DEVICE) if with_skip else None
    c_out = (0.5 + torch.rand(shape[0], generator=gen, dtype=F64)).to(ct(dtype)).to(DEVICE) if with_out else None

    x0 = kernels.x0_estimate_forward(x, eps, alpha_t, c_skip, c_out)
    x_ref, eps_ref = exact(x), exact(eps)
    x0_ref = reference.consistency_x0(x_ref, eps_ref, alpha_t.double(), 0.0 if c_skip is None else c_skip.double(),
                                      1.0 if c_out is None else c_out.double())
    assert x0.dtype == dtype
    assert_matches(x0, x0_ref, "x0")

    want_x, want_eps = torch.autograd.grad(x0_ref, [x_ref, eps_ref], grad.double())
    grad_x, grad_eps = kernels.x0_estimate_backward(grad, alpha_t, c_skip, c_out, True, True)
    assert_matches(grad_x, want_x, "grad_x")
    assert_matches(grad_eps, want_eps, "grad_eps")
    only_eps = kernels.x0_estimate_backward(grad, alpha_t, c_skip, c_out, False, True)
    assert only_eps[0] is None and torch.equal(only_eps[1], grad_eps)
    assert kernels.x0_estimate_backward(grad, alpha_t, c_skip, c_out, False, False) == (None, None)


# --- discounted loss -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_weight", (False, True), ids=["unweighted", "weighted"])
@pytest.mark.parametrize("batch", (1, 3, 33, 1500))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_sqdf_loss(dtype, batch, with_weight):
    gen = torch.Generator().manual_seed(5)
    reward, kl = rand(gen, (batch,), dtype), rand(gen, (batch,), dtype).abs()
    k = torch.randint(0, 12, (batch,), generator=gen).to(dtype).to(DEVICE)
    weight = torch.rand(batch, generator=gen, dtype=F64).to(dtype).to(DEVICE) if with_weight else None
    gamma, alpha = 0.9, 0.05

    loss = kernels.sqdf_loss_forward(reward, kl, k, gamma, alpha, weight)
    leaves = [exact(t) for t in (reward, kl, weight)]
    loss_ref = reference.sqdf_loss(leaves[0], leaves[1], k.double(), gamma, alpha, leaves[2])
    assert loss.shape == () and loss.dtype == dtype
    assert_matches(loss, loss_ref, "loss")

    grad = torch.tensor(1.7, dtype=dtype, device=DEVICE)
    wanted = [leaf for leaf in leaves if leaf is not None]
    want = dict(zip(("reward", "kl", "weight"), torch.autograd.grad(loss_ref, wanted, grad.double())))
    got = kernels.sqdf_loss_backward(grad, reward, kl, k, gamma, alpha, weight, True, True, True)
    for name, g in zip(("reward", "kl", "weight"), got):
        if name in want:
            assert_matches(g, want[name], f"grad_{name}")
        else:
            assert g is None
    partial = kernels.sqdf_loss_backward(grad, reward, kl, k, gamma, alpha, weight, False, True, False)
    assert partial[0] is None and partial[2] is None and torch.equal(partial[1], got[1])


# --- several tiles per sample, determinism ---------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (3, 5, 70, 70)], ids=str)
def test_many_tiles_per_sample_and_determinism(shape):
    """Several KL partial sums per sample (a ragged last tile in the second shape), bitwise equal across runs.
    Several samples per shape, each of several tiles; the finalize kernel sums every sample's row in one program
    for any batch up to FINALIZE_TILE / 2, so a larger batch would only add interpreted programs."""
    gen = torch.Generator().manual_seed(6)
    inp = step_inputs(gen, shape, torch.float32, guided=True, with_ref=True, with_noise=True)
    x_prev, kl = launch_forward(inp)
    leaves, x_prev_ref, kl_ref = step_reference(inp)
    assert_matches(x_prev, x_prev_ref, "x_prev")
    assert_matches(kl, kl_ref, "kl")
    again = launch_forward(inp)
    assert torch.equal(x_prev, again[0]) and torch.equal(kl, again[1])

    grad_x_prev, grad_kl = rand(gen, shape, torch.float32), rand(gen, shape[:1], torch.float32)
    grads = launch_backward(inp, grad_x_prev, grad_kl)
    check_backward(inp, leaves, x_prev_ref, kl_ref, grads, grad_x_prev, grad_kl, set(GRAD_NAMES))
    assert all(torch.equal(a, b) for a, b in zip(grads, launch_backward(inp, grad_x_prev, grad_kl)))

    alpha_t = inp["alpha_t"]
    x0 = kernels.x0_estimate_forward(inp["x"], inp["eps_cond"], alpha_t, None, alpha_t)
    x0_ref = reference.consistency_x0(leaves["x"], leaves["eps_cond"], alpha_t.double(), 0.0, alpha_t.double())
    assert_matches(x0, x0_ref, "x0")
