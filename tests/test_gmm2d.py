"""The gmm2d tasks: closed forms against autograd, Tweedie, Monte Carlo and numeric integration; the exact base
denoiser and its adapter; the importance-sampled target; the metrics; DDIM sampling of the base; a tiny run."""
import json

import pytest
import torch

from sqdf_fast import config
from sqdf_fast.adapters import adapters_disabled, add_policy_lora
from sqdf_fast.rollout import GuidedEps, rollout
from sqdf_fast.schedule import DDIMSchedule
from sqdf_fast.tasks import gmm2d, resolve
from sqdf_fast.train import run

BASE = gmm2d.ring_mixture()
ALPHAS = DDIMSchedule.build(gmm2d.SCHEDULER_CONFIG, 1).alphas_cumprod.double()

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_for(task: str, **overrides) -> config.TrainConfig:
    """The task's own defaults (CONFIG_DEFAULTS), as the trainer resolves them."""
    return config.from_dict({"task": task, **overrides}, "test")


def noisy_points(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t drawn from p_t at random timesteps (0 and 999 included), and a = alphas_cumprod[t], in float64."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (n,), generator=generator)
    t[:2] = torch.tensor([0, 999])
    a = ALPHAS[t]
    x0 = gmm2d.sample(BASE, n, generator)
    return a.sqrt()[:, None] * x0 + (1 - a).sqrt()[:, None] * torch.randn((n, 2), generator=generator,
                                                                         dtype=torch.float64), a


def grid(half_width: float = 8.0, points: int = 601) -> tuple[torch.Tensor, float]:
    axis = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    return torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2), float(axis[1] - axis[0])**2


def test_marginal_score_is_the_gradient_of_the_log_density():
    x, a = noisy_points(256, seed=0)
    x.requires_grad_(True)
    grad, = torch.autograd.grad(gmm2d.marginal_log_prob(x, BASE, a).sum(), x)
    torch.testing.assert_close(gmm2d.marginal_score(x.detach(), BASE, a), grad, rtol=1e-9, atol=1e-9)


def test_posterior_mean_matches_tweedie_and_monte_carlo():
    x, a = noisy_points(256, seed=1)
    score = gmm2d.marginal_score(x, BASE, a)
    tweedie = (x + (1 - a)[:, None] * score) / a.sqrt()[:, None]
    torch.testing.assert_close(gmm2d.posterior_mean(x, BASE, a), tweedie, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(gmm2d.eps_exact(x, BASE, a), -(1 - a).sqrt()[:, None] * score, rtol=1e-8, atol=1e-8)
    # Monte Carlo at mid noise: E[x0 | x_t] = E_p0[x0 N(x_t; sqrt(a) x0, 1 - a)] / E_p0[N(x_t; sqrt(a) x0, 1 - a)]
    x0 = gmm2d.sample(BASE, 2**18, torch.Generator().manual_seed(2))
    a_mid = ALPHAS[300]
    points = torch.tensor([[0.0, 0.0], [1.5, 0.4], [-1.0, -1.8]], dtype=torch.float64)
    for point in points:
        log_lik = -(point - a_mid.sqrt() * x0).square().sum(1) / (2 * (1 - a_mid))
        monte_carlo = (torch.softmax(log_lik, 0)[:, None] * x0).sum(0)
        exact = gmm2d.posterior_mean(point[None], BASE, a_mid[None])[0]
        torch.testing.assert_close(exact, monte_carlo, rtol=0, atol=0.03)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_tilted_mixture_against_numeric_integration(alpha):
    reward = gmm2d.QuadraticReward(gmm2d.REWARD_CENTRE, gmm2d.REWARD_LENGTH)
    tilted, log_z = gmm2d.tilted_mixture(BASE, reward.centre.double(), reward.length, alpha)
    x, cell = grid()
    tilt = (reward(x, None) / alpha).exp()
    components = gmm2d.component_log_probs(x, BASE).exp() * tilt[:, None]    # (N, K): w_k N_k exp(r / alpha)
    z = components.sum() * cell
    assert float(gmm2d.log_prob(x, BASE).exp().sum() * cell) == pytest.approx(1.0, abs=1e-9)
    assert float(z.log()) == pytest.approx(log_z, abs=1e-9)
    torch.testing.assert_close(tilted.weights, components.sum(0) * cell / z, rtol=0, atol=1e-9)
    mass = components.sum(0)
    means = (components[:, :, None] * x[:, None, :]).sum(0) / mass[:, None]
    torch.testing.assert_close(tilted.means, means, rtol=0, atol=1e-8)
    spread = (components * (x[:, None, :] - means).square().sum(-1)).sum(0) / mass / 2
    torch.testing.assert_close(tilted.variances, spread, rtol=1e-7, atol=0)
    # the density itself: p*(x) = p0(x) exp(r(x) / alpha) / Z
    torch.testing.assert_close(gmm2d.log_prob(x, tilted), gmm2d.log_prob(x, BASE) + reward(x, None) / alpha - log_z)
    target = gmm2d.quadratic_target(BASE, reward, alpha)
    expected_reward = float((components.sum(1) * reward(x, None)).sum() * cell / z)
    assert target.expected_reward == pytest.approx(expected_reward, abs=1e-8)


def test_target_keeps_several_modes_at_the_default_alpha():
    alpha = cfg_for("gmm2d").alpha
    weights = gmm2d.quadratic_target(BASE, gmm2d.QuadraticReward(gmm2d.REWARD_CENTRE, gmm2d.REWARD_LENGTH),
                                     alpha).mode_weights
    assert int((weights > 0.05).sum()) >= 3 and float(weights.max()) < 0.6


def test_denoiser_is_the_closed_form_with_the_adapter_off():
    task = resolve("gmm2d")(cfg_for("gmm2d"))
    generator = torch.Generator().manual_seed(3)
    x = torch.randn((128, 2), generator=generator) * 2
    t = torch.randint(0, 1000, (128,), generator=generator)
    cond = torch.zeros(128, dtype=torch.long)
    exact = gmm2d.eps_exact(x.double(), BASE, ALPHAS[t]).float()
    assert torch.equal(task.unet.residual(x, t), torch.zeros_like(x))
    assert torch.equal(task.eps(x, t, cond), exact)
    params = add_policy_lora(task.unet, task.lora_targets, 4, 4.0, seed=0)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    goal = exact + torch.tensor([0.5, -0.3])
    for step in range(20):
        optimizer.zero_grad()
        (task.eps(x, t, cond) - goal).square().mean().backward()
        if step == 2:   # every B and the output layer's base weight start at zero: all adapters learn by step 3
            assert all(float(p.grad.abs().max()) > 0 for p in params)
        optimizer.step()
    with torch.no_grad():
        moved = task.eps(x, t, cond)
    assert float((moved - goal).square().mean()) < 0.5 * float((exact - goal).square().mean())
    with adapters_disabled(task.unet):
        assert torch.equal(task.eps(x, t, cond), exact)


def test_consistency_is_the_posterior_mean_and_survives_any_timestep():
    task = resolve("gmm2d")(cfg_for("gmm2d"))
    x, _ = noisy_points(64, seed=4)
    x = x.float()
    t = torch.full((64,), 500)
    expected = gmm2d.posterior_mean(x.double(), BASE, ALPHAS[t]).float()
    torch.testing.assert_close(task.consistency(x, t, torch.zeros(64, dtype=torch.long)), expected)
    for timestep in (-20, 0, 999, 1200):
        x0 = task.consistency(x, torch.full((64,), timestep), torch.zeros(64, dtype=torch.long))
        assert bool(torch.isfinite(x0).all()), timestep
    torch.testing.assert_close(task.consistency(x, torch.zeros(64, dtype=torch.long), None), x, rtol=0, atol=2e-2)


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_importance_target_has_a_large_ess_and_matches_the_exact_one(alpha):
    ring_reward = gmm2d.HalfPlaneReward(gmm2d.HALF_PLANE_HEIGHT, gmm2d.HALF_PLANE_WIDTH)
    target, ess = gmm2d.importance_target(BASE, ring_reward, alpha, n=2**18)
    assert ess > 0.3
    assert float(target.mode_weights.sum()) == pytest.approx(1.0)
    # the same estimator on the quadratic reward recovers the closed form
    quadratic = gmm2d.QuadraticReward(gmm2d.REWARD_CENTRE, gmm2d.REWARD_LENGTH)
    estimate, _ = gmm2d.importance_target(BASE, quadratic, alpha, n=2**18)
    exact = gmm2d.quadratic_target(BASE, quadratic, alpha)
    torch.testing.assert_close(estimate.mode_weights, exact.mode_weights, rtol=0, atol=0.01)
    assert estimate.expected_reward == pytest.approx(exact.expected_reward, abs=0.02)
    assert estimate.log_normaliser == pytest.approx(exact.log_normaliser, abs=0.01)


@pytest.mark.parametrize("name", ["gmm2d", "gmm2d-ring"])
def test_metrics_tell_the_target_from_the_base(name):
    task = resolve(name)(cfg_for(name))
    cond = torch.zeros(1024, dtype=torch.long)
    base_samples = gmm2d.sample(BASE, 1024, torch.Generator().manual_seed(5)).float()
    if name == "gmm2d":
        tilted, _ = gmm2d.tilted_mixture(BASE, task.reward.centre.double(), task.reward.length, cfg_for(name).alpha)
        target_samples = gmm2d.sample(tilted, 1024, torch.Generator().manual_seed(6)).float()
    else:   # resampled from an importance-sampling run of its own seeds
        proposals = gmm2d.sample(BASE, 2**16, torch.Generator().manual_seed(6))
        weights = torch.softmax(task.reward(proposals, None) / cfg_for(name).alpha, 0)
        target_samples = proposals[torch.multinomial(weights, 1024, replacement=True,
                                                     generator=torch.Generator().manual_seed(7))].float()
    on_target, off_target = task.target_metrics(target_samples, cond), task.target_metrics(base_samples, cond)
    assert on_target["dist_to_target"] < 0.01 and off_target["dist_to_target"] > 0.3
    assert on_target["mode_weight_error"] < 0.05 and off_target["mode_weight_error"] > 0.2
    assert on_target["mode_coverage"] == 1.0
    assert on_target["target_reward"] == off_target["target_reward"]
    collapsed = task.target_metrics(torch.tensor(gmm2d.REWARD_CENTRE).expand(1024, 2), cond)
    assert collapsed["mode_coverage"] < 0.5


def test_ddim_sampling_of_the_base_reproduces_p0():
    cfg = cfg_for("gmm2d")
    task = resolve("gmm2d")(cfg)
    schedule = DDIMSchedule.build(task.scheduler_config, cfg.sample_steps)
    generator = torch.Generator().manual_seed(8)
    n = 4096
    denoiser = lambda x, t, cond: GuidedEps(task.eps(x, t, cond), None, 1.0)
    _, x0, _ = rollout(denoiser, schedule, torch.randn((n, 2), generator=generator),
                       task.sample_conditions(n, generator), cfg.eta, generator)
    weights = torch.bincount(gmm2d.assign_modes(x0, BASE), minlength=gmm2d.NUM_MODES).double() / n
    assert float(0.5 * (weights - BASE.weights).abs().sum()) < 0.04   # sampling noise alone: about 0.016
    reference = gmm2d.sample(BASE, n, torch.Generator().manual_seed(9))
    assert gmm2d.energy_distance(x0.double(), reference) < 0.005


def test_training_run_writes_the_target_metrics(tmp_path):
    cfg = cfg_for("gmm2d", out=str(tmp_path / "run"), steps=2, sample_steps=10, eval_per_class=256, log_every=1,
                  checkpoint_every=2, progress=False)
    summary = run(cfg)
    for name in ("dist_to_target", "mode_weight_error", "mode_coverage", "target_reward"):
        assert summary[f"{name}_final"] == json.loads((tmp_path / "run" / "summary.json").read_text())[f"{name}_final"]
    assert (tmp_path / "run" / "samples_final.png").is_file()


def test_alpha_must_be_positive():
    with pytest.raises(ValueError, match="alpha"):
        resolve("gmm2d-ring")(cfg_for("gmm2d-ring", alpha=0.0))


def test_target_alpha_sets_the_target_whatever_the_runs_alpha():
    """A comparison pins target_alpha: a run at another alpha (or a method without one) is measured against the same
    p*, and an alpha of 0 is fine once the target is given."""
    samples = gmm2d.sample(gmm2d.ring_mixture(), 512, torch.Generator().manual_seed(3)).float()
    cond = torch.zeros(len(samples), dtype=torch.long)
    for name in ("gmm2d", "gmm2d-ring"):
        reference = resolve(name)(cfg_for(name, alpha=1.0)).target_metrics(samples, cond)
        pinned = resolve(name)(cfg_for(name, alpha=0.0, target_alpha=1.0)).target_metrics(samples, cond)
        other = resolve(name)(cfg_for(name, alpha=0.3)).target_metrics(samples, cond)
        assert pinned == reference and other["dist_to_target"] != reference["dist_to_target"]
    with pytest.raises(ValueError, match="target_alpha"):
        config.validate(cfg_for("gmm2d", target_alpha=-1.0))
