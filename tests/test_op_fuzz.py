"""Randomised op tests (issue 14 §4): every backend against float64 over random shapes, strides, dtypes and schedule
values, the edges of the domain included (docs/ops.md §5), forward and backward.

Each test draws its cases from a fixed seed, the same cases for every backend, and a failure names its case. The
rule is `ops_common`'s (flash-attention's): a backend's error against the float64 reference of the same rounded
inputs is at most twice plain PyTorch's plus a floor. "Plain PyTorch" is the reference run in the inputs' dtype or,
if that is more accurate, in the compute dtype and rounded once to the output's (the fused backends' own recipe), so
the bound never grows with 16-bit overflow in the plain run. 300 cases in all (100 per backend), a few seconds: the
Triton interpreter costs about a millisecond per program, and a case needs one or two of its 8192-element tiles.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
from ops_common import F64, FLOOR

from sqdf_fast import ops
from sqdf_fast.ops import reference
from sqdf_fast.ops.checks import compute_dtype

# Everything here is small: torch's intra-op threads would only spin, and no backend's results depend on them.
pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = (F64, torch.float32, torch.bfloat16, torch.float16)
SAMPLE_SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4), (4, 9, 7), (0,), (3, 0)]
BIG_SAMPLE = (3, 64, 50)  # 9600 elements: several of Triton's tiles and of C++'s 4096-element chunks per sample
LAYOUTS = ("contiguous", "contiguous", "strided", "transposed", "expanded")
STEP_CASES, X0_CASES, LOSS_CASES = 60, 25, 15


def tensor(gen: torch.Generator, shape: tuple, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """Standard normal values rounded to dtype, in the memory layout asked (a leaf that can require grad)."""
    def draw(*size):
        return torch.randn(size, generator=gen, dtype=F64).to(dtype)
    if layout == "strided" and len(shape) >= 1:  # every other element of a larger buffer
        t = draw(*shape[:-1], 2 * shape[-1])[..., ::2]
    elif layout == "transposed" and len(shape) >= 2:  # all strides reversed
        t = draw(*shape[::-1]).permute(*reversed(range(len(shape))))
    elif layout == "expanded" and len(shape) >= 2:  # stride 0: one row repeated along dimension 1
        t = draw(shape[0], 1, *shape[2:]).expand(shape)
    else:
        t = draw(*shape)
    return t.detach()


def alpha_pair(rnd: random.Random, dtype: torch.dtype, with_ref: bool) -> tuple[float, float, str]:
    """One sample's (alpha_t, alpha_prev, kind) in the domain 0 < a <= a' <= 1 (alpha_prev < 1 where a < a' with a
    reference), edges included; values the 16-bit dtypes can still represent after the step's scaling."""
    ct = compute_dtype(dtype)
    kinds = ["random"] * 4 + ["same", "clean", "to one", "to one", "issue 14", "tiny", "tiny both", "adjacent",
                              "near one"]
    kind = rnd.choice(kinds)
    if kind == "to one" and with_ref:
        kind = "random"
    if kind == "same":
        a = rnd.uniform(0.01, 0.99)
        return a, a, kind
    if kind == "clean":
        return 1.0, 1.0, kind
    if kind == "to one":
        return rnd.uniform(0.01, 0.99), 1.0, kind
    if kind == "issue 14":
        return 3.8e-5, 0.99982, kind
    if kind == "tiny":  # c_x = sqrt(a' / a): 1e14 overflows float16, not bfloat16
        return (1e-4 if dtype == torch.float16 else 1e-28), rnd.uniform(0.2, 0.9), kind
    if kind == "tiny both":
        a = 10.0 ** rnd.uniform(-30, -20)
        return a, a * rnd.uniform(1.5, 4), kind
    if kind == "adjacent":  # the smallest step the compute dtype has
        a = rnd.uniform(0.01, 0.99)
        a = float(torch.tensor(a, dtype=ct))
        return a, float(torch.nextafter(torch.tensor(a, dtype=ct), torch.tensor(2.0, dtype=ct))), kind
    if kind == "near one":
        k = rnd.randint(8, 20 if ct == torch.float32 else 45)
        return 1 - 2.0 ** -k, 1 - 2.0 ** -(k + rnd.randint(1, 3)), kind
    a, a_prev = sorted(rnd.uniform(0.001, 0.999) for _ in range(2))
    return a, a_prev, kind


def per_sample_arg(rnd: random.Random, values: list[float], dtype: torch.dtype):
    """A per-sample value as the ops take it: a float when all equal (sometimes), else a float64 or compute-dtype
    (B,) tensor; and the float64 values the backends compute from (rounded to the compute dtype)."""
    ct = compute_dtype(dtype)
    exact = torch.tensor(values, dtype=F64).to(ct).double()
    if len(set(values)) == 1 and rnd.random() < 0.4:
        return values[0], exact
    return torch.tensor(values, dtype=rnd.choice((F64, ct))), exact


def check(case: str, name: str, got: torch.Tensor, exact: torch.Tensor, plains: list[torch.Tensor],
          dtype: torch.dtype) -> None:
    """The precision rule on one output; exact must be finite (in-domain draws, no overflow by construction)."""
    got, exact = got.detach().double(), exact.detach()
    assert got.shape == exact.shape, f"{case}: {name} shape"
    if exact.numel() == 0:
        return
    assert bool(exact.isfinite().all()), f"{case}: {name}: the float64 reference is not finite (a bad draw)"
    assert bool(got.isfinite().all()), f"{case}: {name} is not finite"
    err = (got - exact).abs().max().item()
    plain_err = min(torch.nan_to_num((p.detach().double() - exact).abs(), nan=math.inf).max().item() for p in plains)
    bound = 2 * plain_err + FLOOR[dtype] * (1 + exact.abs().max().item())
    assert err <= bound, f"{case}: {name} error {err:.3g} > 2 x plain {plain_err:.3g} + floor ({dtype})"


def leaves(values: dict, dtype: torch.dtype | None) -> dict:
    """Tensors as fresh leaves requiring grad (in `dtype` when given); other values unchanged."""
    return {k: (v.detach().to(dtype or v.dtype).requires_grad_() if isinstance(v, torch.Tensor) else v)
            for k, v in values.items()}


def grads_of(out: dict, inputs: dict, g: dict) -> dict:
    """d(sum of out[k] * g[k]) / d(inputs), by name (float64 upstream gradients, cast to each output's dtype)."""
    total = sum((out[k] * g[k].to(out[k].dtype)).sum() for k in out if out[k] is not None)
    names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    grads = torch.autograd.grad(total, [inputs[k] for k in names], allow_unused=True)
    return {k: torch.zeros_like(inputs[k]) if grad is None else grad for k, grad in zip(names, grads)}


def compare(case: str, dtype: torch.dtype, out_dtype: dict, fn, tensors: dict, g: dict) -> None:
    """Runs fn("op", tensors) and checks each output and gradient against fn("ref", ...) in float64 on the same
    rounded inputs, with plain PyTorch (fn("ref", ...) in dtype, and in the compute dtype) as the baseline."""
    ct = compute_dtype(dtype)
    g = {k: v.to(out_dtype[k]).double() for k, v in g.items()}  # every run sees the same upstream gradients
    got_in = leaves(tensors, None)
    got = fn("op", got_in)
    runs = {}
    for label, run_dtype in (("exact", F64), ("plain", dtype), ("plain-ct", ct)):
        inputs = leaves(tensors, run_dtype)
        runs[label] = (inputs, fn("ref", inputs))
    grads = {label: grads_of(out, inputs, g) for label, (inputs, out) in runs.items()}
    got_grads = grads_of(got, got_in, g)
    for name, value in got.items():
        if value is None:
            continue
        want = out_dtype[name]
        assert value.dtype == want, f"{case}: {name} dtype {value.dtype}, expected {want}"
        plains = [runs["plain"][1][name].to(want), runs["plain-ct"][1][name].to(want)]
        check(case, name, value, runs["exact"][1][name], plains, want)
    for name, value in got_grads.items():
        plains = [grads["plain"][name].to(dtype), grads["plain-ct"][name].to(dtype)]
        check(case, f"grad {name}", value, grads["exact"][name], plains, dtype)


# the step ---------------------------------------------------------------------------------------------------------
def step_case(rnd: random.Random, gen: torch.Generator) -> None:
    dtype = rnd.choice(DTYPES)
    batch = rnd.choice((1, 2, 3, 5))
    shape = (batch, *(BIG_SAMPLE if rnd.random() < 0.04 else rnd.choice(SAMPLE_SHAPES)))
    guided, with_ref = rnd.random() < 0.5, rnd.random() < 0.6
    pairs = [alpha_pair(rnd, dtype, with_ref) for _ in range(batch)]
    alpha_t, exact_a = per_sample_arg(rnd, [p[0] for p in pairs], dtype)
    alpha_prev, exact_ap = per_sample_arg(rnd, [p[1] for p in pairs], dtype)
    eta = rnd.choice((rnd.uniform(0.05, 1.0), 1.0, 0.5, rnd.uniform(1.0, 1.4)) + (() if with_ref else (0.0,)))
    if eta > 1 and bool(reference.ddim_coefficients(exact_a, exact_ap, eta)[0].isnan().any()):
        eta = 1.0  # sigma^2 > 1 - alpha_prev somewhere: outside the domain
    names = ["x", "eps_cond"] + (["eps_uncond"] if guided else []) + (["noise"] if rnd.random() < 0.85 else [])
    names += (["eps_ref_cond"] + (["eps_ref_uncond"] if guided else [])) if with_ref else []
    tensors = {k: tensor(gen, shape, dtype, rnd.choice(LAYOUTS)) for k in names}
    w = rnd.uniform(-1.0, 6.0) if guided else 1.0
    case = (f"step {dtype} {shape} eta={eta:.3g} w={w:.3g} ref={with_ref} inputs={names} "
            f"alphas={[(p[2], p[0], p[1]) for p in pairs]}")
    # the KL's gradient scales with (c_eps / sigma)^2 (up to ~1e9 at the edges): upstream gradients keep it small
    ratio = reference.ddim_coefficients(exact_a, exact_ap, eta)[3].expand(batch)
    g = {"x_prev": tensor(gen, shape, F64, "contiguous"),
         "kl": torch.rand(batch, generator=gen, dtype=F64) / ratio.square().clamp(min=1)}

    def fn(kind, t):
        args = (t["x"], t["eps_cond"], t.get("eps_uncond"), w)
        rest = (t.get("noise"), t.get("eps_ref_cond"), t.get("eps_ref_uncond"))
        if kind == "op":
            x_prev, kl = ops.guided_policy_step(*args, alpha_t, alpha_prev, eta, *rest)
        else:
            x_prev, kl = reference.guided_policy_step(*args, exact_a, exact_ap, eta, *rest)
        return {"x_prev": x_prev, "kl": kl}

    compare(case, dtype, {"x_prev": dtype, "kl": compute_dtype(dtype)}, fn, tensors, g)


# the x0 estimate --------------------------------------------------------------------------------------------------
def x0_case(rnd: random.Random, gen: torch.Generator) -> None:
    dtype = rnd.choice(DTYPES)
    batch = rnd.choice((1, 2, 3, 5))
    shape = (batch, *(BIG_SAMPLE if rnd.random() < 0.04 else rnd.choice(SAMPLE_SHAPES)))
    tiny = 1e-4 if dtype == torch.float16 else 1e-20  # x / sqrt(a) stays representable
    values = [rnd.choice((rnd.uniform(0.001, 1.0), 1.0, tiny, 1 - 2.0 ** -rnd.randint(8, 20), 3.8e-5))
              for _ in range(batch)]
    alpha_t, exact_a = per_sample_arg(rnd, values, dtype)
    scalings = []
    for _ in range(2):
        if rnd.random() < 0.4:
            scalings.append((None, None))
        else:
            scalings.append(per_sample_arg(rnd, [rnd.gauss(0, 1.5) for _ in range(batch)], dtype))
    (c_skip, exact_skip), (c_out, exact_out) = scalings
    tensors = {k: tensor(gen, shape, dtype, rnd.choice(LAYOUTS)) for k in ("x", "eps")}
    case = f"x0 {dtype} {shape} alpha={values} c_skip={c_skip is not None} c_out={c_out is not None}"

    def fn(kind, t):
        if kind == "op":
            return {"x0": ops.consistency_x0(t["x"], t["eps"], alpha_t, c_skip, c_out)}
        return {"x0": reference.consistency_x0(t["x"], t["eps"], exact_a, 0.0 if exact_skip is None else exact_skip,
                                               1.0 if exact_out is None else exact_out)}

    compare(case, dtype, {"x0": dtype}, fn, tensors, {"x0": tensor(gen, shape, F64, "contiguous")})


# the loss ---------------------------------------------------------------------------------------------------------
def loss_case(rnd: random.Random, gen: torch.Generator) -> None:
    dtype = rnd.choice((F64, torch.float32))
    batch = rnd.choice((1, 3, 33, 1500))
    layout = rnd.choice(("contiguous", "strided"))
    tensors = {"reward": tensor(gen, (batch,), dtype, layout), "kl": tensor(gen, (batch,), dtype, layout).abs()}
    if rnd.random() < 0.5:
        tensors["weight"] = torch.rand(batch, generator=gen, dtype=F64).to(dtype)
    k = rnd.choice((torch.randint(0, 50, (batch,), generator=gen), torch.zeros(batch, dtype=torch.long),
                    30 * torch.rand(batch, generator=gen, dtype=F64)))
    gamma = rnd.choice((1.0, rnd.uniform(0.5, 1.0), 1e-3))
    alpha = rnd.choice((0.0, rnd.uniform(0.0, 3.0)))
    case = f"loss {dtype} B={batch} {layout} k={k.dtype} gamma={gamma:.3g} alpha={alpha:.3g} {sorted(tensors)}"

    def fn(kind, t):
        loss = ops.sqdf_loss if kind == "op" else reference.sqdf_loss
        return {"loss": loss(t["reward"], t["kl"], k, gamma, alpha, t.get("weight"))}

    compare(case, dtype, {"loss": dtype}, fn, tensors, {"loss": torch.tensor(rnd.gauss(0, 1), dtype=F64)})


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # numpy's, for masked-off lanes in the interpreter
@pytest.mark.parametrize("op, cases", [(step_case, STEP_CASES), (x0_case, X0_CASES), (loss_case, LOSS_CASES)],
                         ids=["step", "x0", "loss"])
def test_random_cases_against_float64(backend, op, cases):
    rnd, gen = random.Random(14), torch.Generator().manual_seed(14)
    for _ in range(cases):
        op(rnd, gen)
