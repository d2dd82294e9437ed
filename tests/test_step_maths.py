"""The SQDF step maths (`sqdf_fast.ops`, `sqdf_fast.schedule`) against diffusers' DDIMScheduler and closed forms.

Everything runs in float64 so that agreement can be asserted to rounding error, not to float32 tolerances.
"""
from __future__ import annotations

import functools
import math
from decimal import Decimal, localcontext
from fractions import Fraction

import pytest
import torch
from diffusers import DDIMScheduler
from torch.distributions import Normal, kl_divergence
from torch.testing import assert_close

from sqdf_fast import ops
from sqdf_fast.ops import reference
from sqdf_fast.schedule import DDIMSchedule
from sqdf_fast.tasks.digits import SCHEDULER_CONFIG as DIGITS_CONFIG

# Every tensor here is far below the C++ kernels' parallel threshold (csrc/sqdf_cpu.cpp, kParallelMin), so the
# thread count changes no backend's path; torch's intra-op threads would only spin on these small tensors.
pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
TIGHT = dict(rtol=1e-12, atol=1e-12)  # float64 rounding, a few operations deep

SD15_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
)
CONFIGS = {"digits": DIGITS_CONFIG, "sd15": SD15_CONFIG}
NUM_STEPS = (1, 7, 20, 50)
SHAPES = [(1, 4, 8, 8), (3, 7, 5), (5,), (33, 2, 3)]
LAYOUTS = ("contiguous", "strided", "transposed")

@functools.cache
def tables(config: str, num_steps: int) -> tuple[DDIMSchedule, DDIMScheduler]:
    """The float64 schedule, and a diffusers scheduler set to the same number of steps with float64 tables.

    diffusers keeps alphas_cumprod in float32 and computes the step's scalar coefficients (sqrt(1 - a), ...) in that
    dtype even for float64 samples, so left alone it agrees with the float64 ops only to ~1e-6 relative
    (test_float32_scheduler_agrees_to_float32_rounding). Both sides read the same float32-representable alphas, so
    once the scheduler's tables are cast to float64 the two agree to float64 rounding."""
    schedule = DDIMSchedule.build(CONFIGS[config], num_steps, dtype=F64)
    scheduler = DDIMScheduler.from_config(CONFIGS[config])
    scheduler.set_timesteps(num_steps)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(F64)
    scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=F64)
    return schedule, scheduler


def prev_timestep(scheduler: DDIMScheduler, t: int) -> int:
    """diffusers' own previous timestep (negative after the last transition)."""
    return t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def randn(gen: torch.Generator, shape, layout: str = "contiguous") -> torch.Tensor:
    """A float64 normal tensor of `shape`, laid out in memory as asked."""
    if layout == "strided":  # every other element of a larger buffer
        return torch.randn(*shape, 2, generator=gen, dtype=F64)[..., 0]
    if layout == "transposed":  # all strides reversed: the batch dimension is the fastest
        return torch.randn(*shape[::-1], generator=gen, dtype=F64).permute(*reversed(range(len(shape))))
    return torch.randn(*shape, generator=gen, dtype=F64)


# schedule tables --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_steps", NUM_STEPS)
@pytest.mark.parametrize("config", CONFIGS)
def test_schedule_tables_match_diffusers(config, num_steps):
    schedule, scheduler = tables(config, num_steps)
    assert schedule.num_steps == num_steps and schedule.alpha_t.dtype == schedule.alpha_prev.dtype == F64
    assert torch.equal(schedule.timesteps, scheduler.timesteps.long())
    assert torch.equal(schedule.alphas_cumprod, scheduler.alphas_cumprod)
    for j, t in enumerate(schedule.timesteps.tolist()):
        prev = prev_timestep(scheduler, t)
        assert schedule.next_timesteps[j] == max(prev, 0)
        if j + 1 < num_steps:  # t_{j+1} is the next transition's input timestep
            assert schedule.next_timesteps[j] == schedule.timesteps[j + 1]
        assert schedule.alpha_t[j] == scheduler.alphas_cumprod[t]
        assert schedule.alpha_prev[j] == (scheduler.alphas_cumprod[prev] if prev >= 0
                                          else scheduler.final_alpha_cumprod)
    assert prev_timestep(scheduler, int(schedule.timesteps[-1])) < 0  # the last transition lands on x0


# one DDIM step against diffusers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("num_steps", NUM_STEPS)
@pytest.mark.parametrize("config", CONFIGS)
def test_policy_step_matches_diffusers(gen, backend, config, num_steps, eta):
    """Every transition of the chain at once: transition j's sample is rows 2j, 2j + 1 of one batch with per-sample
    schedule values (one op call, one interpreted launch for triton), checked against diffusers' step at t_j. That
    per-sample values equal scalar calls row by row is test_per_sample_schedule_values_equal_rowwise_scalar_calls."""
    schedule, scheduler = tables(config, num_steps)
    sigma = schedule.sigma(eta)
    x, eps, noise, eps_ref = (randn(gen, (num_steps * 2, 3, 4, 4)) for _ in range(4))
    rows = torch.arange(num_steps).repeat_interleave(2)  # the transition of each row
    a, a_prev = schedule.alpha_t[rows], schedule.alpha_prev[rows]
    x_prev, kl = ops.policy_step(x, eps, a, a_prev, eta, noise)
    assert kl is None
    x0 = ops.tweedie_x0(x, eps, a)
    if eta > 0:  # asking for the KL must not change the step
        assert torch.equal(ops.policy_step(x, eps, a, a_prev, eta, noise, eps_ref)[0], x_prev)
    for j, t in enumerate(schedule.timesteps.tolist()):
        sample = slice(2 * j, 2 * j + 2)
        out = scheduler.step(eps[sample], t, x[sample], eta=eta, variance_noise=noise[sample])
        assert_close(x_prev[sample], out.prev_sample, **TIGHT)
        assert_close(x0[sample], out.pred_original_sample, **TIGHT)
        assert_close(sigma[j], eta * scheduler._get_variance(t, prev_timestep(scheduler, t)).sqrt(), **TIGHT)


def test_float32_scheduler_agrees_to_float32_rounding(gen):
    """Documents why `tables` casts: diffusers' own float32 tables give float32-rounded coefficients."""
    schedule, _ = tables("sd15", 50)
    scheduler = DDIMScheduler.from_config(SD15_CONFIG)
    scheduler.set_timesteps(50)
    for j, t in enumerate(schedule.timesteps.tolist()):
        x, eps, noise = (randn(gen, (2, 3, 4, 4)) for _ in range(3))
        out = scheduler.step(eps, t, x, eta=1.0, variance_noise=noise)
        x_prev, _ = ops.policy_step(x, eps, schedule.alpha_t[j], schedule.alpha_prev[j], 1.0, noise)
        assert_close(x_prev, out.prev_sample, rtol=1e-5, atol=1e-5)


# per-sample schedule values, shapes, memory layouts ---------------------------------------------------------------
def test_per_sample_schedule_values_equal_rowwise_scalar_calls(gen, backend):
    schedule, _ = tables("sd15", 20)
    j = torch.tensor([0, 19, 7, 7, 12])  # first, last and repeated transitions in one batch
    x, eps, noise, eps_ref = (randn(gen, (5, 3, 4)) for _ in range(4))
    a, a_prev = schedule.alpha_t[j], schedule.alpha_prev[j]
    x_prev, kl = ops.policy_step(x, eps, a, a_prev, 0.6, noise, eps_ref)
    x0 = ops.tweedie_x0(x, eps, a)
    for i in range(len(j)):
        row = slice(i, i + 1)
        x_prev_i, kl_i = ops.policy_step(x[row], eps[row], float(a[i]), float(a_prev[i]), 0.6, noise[row],
                                         eps_ref[row])
        assert_close(x_prev[row], x_prev_i, **TIGHT)
        assert_close(kl[row], kl_i, **TIGHT)
        assert_close(x0[row], ops.tweedie_x0(x[row], eps[row], float(a[i])), **TIGHT)
        # a 0-dim tensor is a scalar too
        assert_close(x_prev[row], ops.policy_step(x[row], eps[row], a[i], a_prev[i], 0.6, noise[row])[0], **TIGHT)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_policy_step_shapes_and_layouts(gen, backend, shape, layout):
    """Any (B, ...) shape and memory layout: rows with their own transition match diffusers row by row, and a
    non-contiguous input gives what its contiguous copy gives."""
    schedule, scheduler = tables("digits", 20)
    j = torch.arange(shape[0]) % 20
    x, eps, noise = (randn(gen, shape, layout) for _ in range(3))
    if layout == "strided" or (layout == "transposed" and x.dim() > 1):  # a 1-D transpose is the identity
        assert not x.is_contiguous()
    a, a_prev = schedule.alpha_t[j], schedule.alpha_prev[j]
    x_prev, kl = ops.policy_step(x, eps, a, a_prev, 0.8, noise)
    x0 = ops.tweedie_x0(x, eps, a)
    assert x_prev.shape == x0.shape == shape and kl is None
    contiguous = [v.contiguous() for v in (x, eps)]
    assert_close(x_prev, ops.policy_step(*contiguous, a, a_prev, 0.8, noise.contiguous())[0], **TIGHT)
    assert_close(x0, ops.tweedie_x0(*contiguous, a), **TIGHT)
    for i, t in enumerate(schedule.timesteps[j].tolist()):
        out = scheduler.step(eps[i], t, x[i], eta=0.8, variance_noise=noise[i])
        assert_close(x_prev[i], out.prev_sample, **TIGHT)
        assert_close(x0[i], out.pred_original_sample, **TIGHT)


# the KL term -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES,
                         ids=str)
def test_kl_is_scaled_gaussian_kl(gen, backend, shape, layout, eta):
    schedule, _ = tables("sd15", 50)
    batch = shape[0]
    j = torch.arange(batch) * 7 % 50
    a, a_prev = schedule.alpha_t[j], schedule.alpha_prev[j]
    x, eps, eps_ref, noise = (randn(gen, shape, layout) for _ in range(4))
    _, kl = ops.policy_step(x, eps, a, a_prev, eta, noise, eps_ref)
    assert kl.shape == (batch,)
    assert_close(kl, ops.policy_step(*(v.contiguous() for v in (x, eps)), a, a_prev, eta, noise.contiguous(),
                                     eps_ref.contiguous())[1], **TIGHT)

    # kl = (2 / d) KL(N(mu, sigma^2 I) || N(mu_ref, sigma^2 I)), d the number of non-batch elements
    sigma = schedule.sigma(eta)[j]
    mu = reference.ddim_mean(x, eps, a, a_prev, sigma)
    mu_ref = reference.ddim_mean(x, eps_ref, a, a_prev, sigma)
    scale = reference.per_sample(sigma, x).expand_as(x)
    kl_true = kl_divergence(Normal(mu, scale), Normal(mu_ref, scale)).reshape(batch, -1).sum(1)
    d = x[0].numel()
    assert_close(kl, 2 / d * kl_true, **TIGHT)

    # fused form: mu - mu_ref = c (eps - eps_ref), c = sqrt(1 - a' - sigma^2) - sqrt(a' (1 - a) / a)
    c = (1 - a_prev - sigma.square()).sqrt() - (a_prev * (1 - a) / a).sqrt()
    assert_close(kl, (c / sigma).square() * (eps - eps_ref).square().reshape(batch, -1).mean(1), **TIGHT)


# the coefficients in float64, at the domain's edges (docs/ops.md §5) -----------------------------------------------
def exact_coefficients(a: float, a_prev: float, eta: float) -> list[float]:
    """(c_x, c_eps, sigma, c_eps / sigma) of float64 inputs to ~80 digits: rational arithmetic, square roots in
    decimal. c_eps here is the textbook difference sqrt(1 - a' - sigma^2) - c_x sqrt(1 - a), whose cancellation the
    extra digits absorb."""
    big_a, big_p, big_e = Fraction(a), Fraction(a_prev), Fraction(eta)
    sigma_sq = big_e * big_e * (1 - big_p) * (big_p - big_a) / ((1 - big_a) * big_p)
    with localcontext() as ctx:
        ctx.prec = 80

        def dec(f: Fraction) -> Decimal:
            return Decimal(f.numerator) / Decimal(f.denominator)

        c_x = (dec(big_p) / dec(big_a)).sqrt()
        c_eps = dec(1 - big_p - sigma_sq).sqrt() - c_x * dec(1 - big_a).sqrt()
        sigma = dec(sigma_sq).sqrt()
        return [float(v) for v in (c_x, c_eps, sigma, c_eps / sigma if sigma else Decimal("nan"))]


def _next_up(value: float, dtype: torch.dtype) -> float:
    return float(torch.nextafter(torch.tensor(value, dtype=dtype), torch.tensor(2.0, dtype=dtype)))


EDGE_SCHEDULES = {
    "ordinary": (0.3, 0.6), "issue 14: a = 3.8e-5 to a' = 0.99982": (3.8e-5, 0.99982),
    "tiny a": (1e-30, 0.5), "tiny both": (1e-20, 3e-20), "near 1": (1 - 2.0 ** -40, 1 - 2.0 ** -42),
    "adjacent float32": (0.7, _next_up(0.7, torch.float32)), "adjacent float64": (0.7, _next_up(0.7, F64)),
    "to 1": (0.2, 1.0),
}


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0, 1.3])
@pytest.mark.parametrize("schedule", EDGE_SCHEDULES)
def test_ddim_coefficients_to_float64_rounding(schedule, eta):
    """reference.ddim_coefficients (the forms and order of operations every backend uses) is within a few float64
    ulps of the exact coefficients, where the textbook formulas lose most of their digits to cancellation."""
    a, a_prev = EDGE_SCHEDULES[schedule]
    got = [float(v) for v in reference.ddim_coefficients(a, a_prev, eta)]
    if eta > 1 and eta * eta * (a_prev - a) > (1 - a) * a_prev and a_prev < 1:  # sigma^2 > 1 - a': outside
        assert all(math.isnan(v) for v in got)
        return
    want = exact_coefficients(a, a_prev, eta)
    for name, g, w in zip(("c_x", "c_eps", "sigma", "ratio"), got, want):
        if math.isnan(w):
            assert math.isnan(g), name   # sigma = 0 at a < a': the KL's ratio is not defined
        else:
            assert g == pytest.approx(w, rel=1e-14, abs=0), name


def test_ddim_coefficients_at_equal_alphas_and_outside():
    """a = a' (the clean end 1 = 1 included) is the identity; outside 0 < a <= a' <= 1 everything is NaN."""
    a = torch.tensor([0.4, 1.0, 0.5, 0.0, 0.5, 1.2], dtype=F64)
    a_prev = torch.tensor([0.4, 1.0, 0.4, 0.5, 1.5, 1.2], dtype=F64)
    for got, identity in zip(reference.ddim_coefficients(a, a_prev, 0.8), (1.0, 0.0, 0.0, 0.0)):
        assert got[:2].tolist() == [identity] * 2 and bool(got[2:].isnan().all())
    assert reference.ddim_sigma(a, a_prev, 0.8)[:2].tolist() == [0.0, 0.0]
