"""gmm2d.posterior_mixture against posterior_mean and importance weighting; bench/soft_value_bias.py's soft value
against the closed form (quadratic reward) and posterior sampling (ring reward), its agreement with r(E[x0|x]) at
small noise; the soft-Q estimator's bias against V (below it, shrinking with n, vanishing at small noise); the script
at tiny sizes (a few seconds in all)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from bench_scripts import load_bench

from sqdf_fast.schedule import DDIMSchedule
from sqdf_fast.tasks import gmm2d

BASE = gmm2d.ring_mixture()
ALPHAS = DDIMSchedule.build(gmm2d.SCHEDULER_CONFIG, 1).alphas_cumprod.double()

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    return load_bench("soft_value_bias")


def points_from_marginal(n: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    a = ALPHAS[t].reshape(1)
    x0 = gmm2d.sample(BASE, n, generator)
    return a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=generator, dtype=torch.float64), a


def one_point(posterior: gmm2d.Mixture, i: int) -> gmm2d.Mixture:
    return gmm2d.Mixture(posterior.weights[i], posterior.means[i], posterior.variances[i])


@pytest.mark.parametrize("t", [300, 700])
def test_posterior_mixture_samples_match_posterior_mean_and_importance_weights(t):
    points = torch.tensor([[0.0, 0.0], [1.5, 0.4], [-1.0, -1.8]], dtype=torch.float64)
    a = ALPHAS[t].expand(len(points))
    posterior = gmm2d.posterior_mixture(points, BASE, a)
    torch.testing.assert_close(posterior.weights.sum(-1), torch.ones(3, dtype=torch.float64))
    mean = gmm2d.posterior_mean(points, BASE, a)
    prior = gmm2d.sample(BASE, 2**18, torch.Generator().manual_seed(1))
    for i, point in enumerate(points):
        draws = gmm2d.sample(one_point(posterior, i), 2**16, torch.Generator().manual_seed(2 + i))
        torch.testing.assert_close(draws.mean(0), mean[i], rtol=0, atol=0.02)
        # second moments against p(x0 | x_t) ∝ p0(x0) N(x_t; sqrt(a) x0, 1 - a), self-normalised over p0 samples
        weights = torch.softmax(-(point - a[i].sqrt() * prior).square().sum(1) / (2 * (1 - a[i])), 0)
        second = (weights[:, None, None] * prior[:, :, None] * prior[:, None, :]).sum(0)
        torch.testing.assert_close((draws[:, :, None] * draws[:, None, :]).mean(0), second, rtol=0, atol=0.05)


def test_soft_value_quadrature_is_exact_for_the_quadratic_reward_and_matches_posterior_sampling_on_the_ring(bench):
    quadrature = bench.gauss_hermite_2d(16)
    rewards = bench.rewards()
    quadratic = rewards["gmm2d"]
    centre, length_sq = quadratic.centre.double(), quadratic.length**2
    for t in (900, 400, 50):
        x, a = points_from_marginal(64, t, seed=t)
        v, posterior = bench.soft_value(x, BASE, a.expand(64), quadratic, 1.0, quadrature)
        # E_{N(m, u I)}[exp(-|x0 - c|^2 / (2 l^2))] = l^2 / (l^2 + u) exp(-|m - c|^2 / (2 (l^2 + u))) in 2-D
        total = length_sq + posterior.variances
        exact = torch.logsumexp(posterior.weights.log() + torch.log(length_sq / total)
                                - (posterior.means - centre).square().sum(-1) / (2 * total), -1)
        torch.testing.assert_close(v, exact, rtol=0, atol=1e-10)
    ring = rewards["gmm2d-ring"]
    x, a = points_from_marginal(4, 400, seed=3)
    v, posterior = bench.soft_value(x, BASE, a.expand(4), ring, 1.0, quadrature)
    for i in range(4):
        draws = gmm2d.sample(one_point(posterior, i), 2**16, torch.Generator().manual_seed(10 + i))
        monte_carlo = torch.logsumexp(ring(draws, None), 0) - torch.log(torch.tensor(2.0**16))
        torch.testing.assert_close(v[i], monte_carlo.double(), rtol=0, atol=0.01)


def test_soft_value_agrees_with_the_reward_of_the_posterior_mean_only_at_small_noise(bench):
    quadratic, quadrature = bench.rewards()["gmm2d"], bench.gauss_hermite_2d(16)
    x, a = points_from_marginal(256, 10, seed=0)   # a = 0.9989: the posterior is a near-point mass
    small = bench.values_and_gradients(x, a, quadratic, 1.0, quadrature)
    assert float((small["v"] - small["r_e"]).abs().max()) < 5e-3
    stats = bench.summarise(small, torch.ones(256, dtype=torch.bool))
    assert abs(stats["mean_grad_ratio"] - 1) < 0.02 and stats["mean_cosine"] > 0.999
    x, a = points_from_marginal(256, 800, seed=0)  # a = 0.002: r(E) is steeper than V (first-order in the tilt)
    large = bench.summarise(bench.values_and_gradients(x, a, quadratic, 1.0, quadrature),
                            torch.ones(256, dtype=torch.bool))
    assert large["mean_grad_ratio"] > 1.5


def test_script_main_at_tiny_sizes(bench, tmp_path):
    out = tmp_path / "svb.json"
    result = bench.main(["--points", "64", "--nodes", "6", "--steps", "0", "30", "--importance-samples", "4096",
                         "--q-configs", "bridge:1", "--q-samples", "1", "4", "--q-points", "32", "--replicates", "2",
                         "--json", str(out)])
    stored = json.loads(out.read_text())
    assert stored["rows"] == json.loads(json.dumps(result["rows"]))
    assert [(row["task"], row["t"]) for row in stored["rows"]] == [
        ("gmm2d", 961), ("gmm2d", 361), ("gmm2d-ring", 961), ("gmm2d-ring", 361)]
    assert "bench/soft_value_bias.py" in stored["command"] and stored["torch"] == torch.__version__
    assert stored["device"] and stored["rows"][0]["all"]["n"] == 64 and stored["rows"][0]["sigma_sq"] > 0
    soft_q = stored["soft_q"]["rows"]
    assert [(row["task"], row["t"], row["sampler"], row["steps"], row["n"]) for row in soft_q] == [
        (task, t, "bridge", 1, n) for task in ("gmm2d", "gmm2d-ring") for t in (961, 361) for n in (1, 4)]
    assert all(row["all"]["n"] == 32 and math.isfinite(row["all"]["mean_grad_ratio"]) for row in soft_q)
    ring = stored["targets"]["gmm2d-ring"]
    assert abs(sum(ring["mode_weights"]) - 1) < 1e-3 and ring["upper_modes_mass"] > ring["lower_modes_mass"]


def test_soft_q_estimator_is_below_v_by_less_as_n_grows_and_matches_it_at_small_noise(bench):
    ring = bench.rewards()["gmm2d-ring"]
    quadrature = bench.gauss_hermite_2d(12)
    alphas = DDIMSchedule.build(gmm2d.SCHEDULER_CONFIG, 1, dtype=torch.float64).alphas_cumprod
    x, a = points_from_marginal(128, 400, seed=1)
    q = bench.values_and_gradients(x, a, ring, 1.0, quadrature)
    everything = torch.ones(128, dtype=torch.bool)
    bias = {}
    for n in (1, 16):
        draws, grads = bench.soft_q_draws(x, 400, alphas, ring, 1.0, n, 4, "bridge", 4,
                                          torch.Generator().manual_seed(0))
        bias[n] = bench.summarise_soft_q(draws, grads, q, everything)["mean_bias_q_minus_v"]
    assert bias[1] < bias[16] < 0   # Jensen, shrinking with n
    x, a = points_from_marginal(128, 10, seed=2)   # a near-point-mass posterior: every estimate is V
    q = bench.values_and_gradients(x, a, ring, 1.0, quadrature)
    draws, grads = bench.soft_q_draws(x, 10, alphas, ring, 1.0, 4, 2, "bridge", 2, torch.Generator().manual_seed(0))
    stats = bench.summarise_soft_q(draws, grads, q, everything)
    assert abs(stats["mean_bias_q_minus_v"]) < 5e-3 and stats["mean_abs_error"] < 0.02
    assert abs(stats["mean_grad_ratio"] - 1) < 0.02 and stats["mean_cosine"] > 0.999
