"""The soft-Q estimate of SQDF (--q-samples n, --q-steps m; docs/method.md §3.6): the log-mean-exp's Jensen bias
against a closed form, q_samples 1 being today's estimate exactly, the bridge against the exact posterior of gmm2d,
where gradients go, the batched call, the SD task's tiny pipeline, and config validation."""
import math

import pytest
import torch
from sd_fixtures import make_tiny_lcm_lora, make_tiny_pipeline, tiny_sd_config

from sqdf_fast import config, ops, tasks
from sqdf_fast.adapters import add_policy_lora
from sqdf_fast.methods.sqdf import SQDF, log_mean_exp, posterior_bridge
from sqdf_fast.ops.reference import per_sample
from sqdf_fast.schedule import DDIMSchedule
from sqdf_fast.tasks import digits, gmm2d


def setup(**overrides):
    cfg = config.TrainConfig(**overrides)
    config.validate(cfg)
    task = digits.make_task(cfg)
    schedule = DDIMSchedule.build(task.scheduler_config, cfg.sample_steps)
    params = add_policy_lora(task.unet, task.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    with torch.no_grad():   # the policy differs from the base, so that the KL and its gradient are not zero
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    return cfg, task, schedule, params, SQDF(task, schedule, cfg)


def batch(task, n=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, *task.sample_shape), generator=g)
    return x, torch.tensor([0, 7, 12, 19])[:n], task.sample_conditions(n, g), g


# ---- the estimator's bias: a closed form -------------------------------------------------------------------------
def test_log_mean_exp_jensen_bias_matches_the_binomial_closed_form():
    """r in {0, h} with P(h) = p: E[log mean exp] is a finite sum over the binomial count, V = alpha log(1 - p +
    p e^(h/alpha)); the estimator's mean matches the former, lies below the latter, and its bias shrinks like the
    delta method's alpha (E[w^2]/E[w]^2 - 1) / (2n)."""
    p, h, alpha = 0.3, 2.0, 1.0
    exact_v = alpha * math.log(1 - p + p * math.exp(h / alpha))
    w1, w2 = 1 - p + p * math.exp(h / alpha), 1 - p + p * math.exp(2 * h / alpha)   # E[w], E[w^2]
    generator = torch.Generator().manual_seed(0)
    biases = {}
    for n in (1, 4, 16, 64):
        closed = sum(math.comb(n, k) * p**k * (1 - p)**(n - k) * alpha * math.log((n - k + k * math.exp(h / alpha)) / n)
                     for k in range(n + 1))
        draws = h * (torch.rand((n, 20000), generator=generator, dtype=torch.float64) < p).double()
        estimates = log_mean_exp(draws, alpha)
        standard_error = float(estimates.std()) / math.sqrt(estimates.shape[0])
        assert abs(float(estimates.mean()) - closed) < 4 * standard_error + 1e-12, n
        biases[n] = closed - exact_v
        assert biases[n] < 0   # Jensen: the finite-n estimate under-estimates V
    assert abs(biases[1] - (p * h - exact_v)) < 1e-12   # n = 1 is E[r]
    delta = -alpha * (w2 / w1**2 - 1) / (2 * 64)
    assert abs(biases[64] / delta - 1) < 0.1
    assert abs(biases[16]) < abs(biases[4]) < abs(biases[1])
    # alpha = 0 is the max (the limit), and the gradient is the softmax-weighted one
    r = torch.tensor([[0.1, -1.0], [0.3, -2.0], [0.2, -0.5]], requires_grad=True)
    torch.testing.assert_close(log_mean_exp(r, 0.0), torch.tensor([0.3, -0.5]))
    log_mean_exp(r, 0.5).sum().backward()
    torch.testing.assert_close(r.grad, torch.softmax(r.detach() / 0.5, 0))


# ---- the bridge sampler ----------------------------------------------------------------------------------------
def test_bridge_with_many_steps_samples_the_exact_posterior(one_thread):
    """On gmm2d, whose posterior mean is exact, the ancestral bridge from x_t approaches p(x0 | x_t) as the steps
    get finer: its mean and mode masses match the exact posterior mixture; one step is far too narrow."""
    base = gmm2d.ring_mixture()
    alphas = DDIMSchedule.build(gmm2d.SCHEDULER_CONFIG, 1, dtype=torch.float64).alphas_cumprod
    t, n = 500, 8192
    x = torch.tensor([[0.3, 0.1]], dtype=torch.float64)   # near the origin: the posterior is split over the modes
    exact = gmm2d.posterior_mixture(x, base, alphas[t].reshape(1))
    generator = torch.Generator().manual_seed(0)
    masses = {}
    for steps in (1, 50):
        noise = torch.randn((steps, n, 2), generator=generator, dtype=torch.float64)
        x0 = posterior_bridge(lambda y, s: gmm2d.posterior_mean(y, base, alphas[s]), x.expand(n, 2),
                              torch.full((n,), t), alphas, noise)
        masses[steps] = torch.bincount(gmm2d.assign_modes(x0, base), minlength=8).double() / n
        if steps == 50:
            torch.testing.assert_close(x0.mean(0), (exact.weights[0, :, None] * exact.means[0]).sum(0), rtol=0,
                                       atol=0.1)
    total_variation = {steps: float(0.5 * (m - exact.weights[0]).abs().sum()) for steps, m in masses.items()}
    assert total_variation[50] < 0.05 and total_variation[1] > 0.08


# ---- the trainer's estimate -----------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["consistency", "tweedie"])
def test_one_sample_without_steps_is_todays_estimate_exactly(estimator):
    """q_samples 1, q_steps 0 (the defaults): the loss and the random stream are those of the paper's estimate,
    r(decode(x0_hat(a))), computed here from the ops directly."""
    cfg, task, schedule, params, method = setup(q_estimator=estimator, sample_steps=20)
    x, j, cond, g = batch(task)
    state = g.get_state()
    loss, stats = method.loss(x, j, cond, None, g)
    after = g.get_state()
    g.set_state(state)
    t, t_next = schedule.timesteps[j], schedule.next_timesteps[j]
    eps = method.policy_eps(x, t, cond)
    with torch.no_grad():
        ref = method.reference_eps(x, t, cond)
    noise = torch.randn(x.shape, generator=g)
    action, kl = ops.guided_policy_step(x, eps.cond, eps.uncond, eps.guidance, schedule.alpha_t[j],
                                        schedule.alpha_prev[j], cfg.eta, noise, ref.cond, ref.uncond)
    if estimator == "consistency":
        x0 = task.consistency(action, t_next, cond)
    else:
        x0 = ops.tweedie_x0(action, method.reference_eps(action, t_next, cond).combined(), schedule.alpha_prev[j])
    x0 = torch.where(per_sample(j == 19, action).bool(), action, x0)
    reward = task.reward(x0, cond)
    expected = ops.sqdf_loss(reward, kl, 19 - j, cfg.gamma, cfg.alpha, None)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(stats["reward_q"], reward.detach().mean(), rtol=0, atol=0)
    assert torch.equal(g.get_state(), after)   # no extra random numbers


def test_soft_q_is_one_batched_call_per_step_with_gradient_into_the_action_only():
    cfg, task, schedule, params, method = setup(q_samples=3, q_steps=2, checkpoint_estimator=False)
    calls = []
    forward = task.consistency.forward
    task.consistency.forward = lambda x, t, cond: calls.append((x.shape[0], t.clone())) or forward(x, t, cond)
    a, j, cond, g = batch(task)
    a.requires_grad_(True)
    state = g.get_state()
    q = method.soft_q(a, j, cond, g)
    # m + 1 calls on n B rows each (sample-major) at the bridge's timesteps t_{j+1}, 2 t_{j+1} / 3, 2 t_{j+1} / 9
    assert [rows for rows, _ in calls] == [12, 12, 12]
    t_next = schedule.next_timesteps[j].repeat(3)
    assert [t.tolist() for _, t in calls] == [t_next.tolist(), (t_next * 2 // 3).tolist(),
                                              (t_next * 2 // 3 // 3).tolist()]
    assert q.shape == (4,) and bool(torch.isfinite(q).all())
    # after the last transition every sample is a itself: Q = r(a) (to the log-sum-exp's rounding)
    torch.testing.assert_close(q[3], task.reward(a[3:4], cond[3:4])[0], rtol=1e-6, atol=1e-6)
    g.set_state(state)
    torch.randn((2, 12, *task.sample_shape), generator=g)
    after_bridge = g.get_state()
    q.sum().backward()
    assert a.grad is not None and float(a.grad[:3].abs().sum()) > 0
    for module in [task.unet, *task.frozen]:
        assert all(p.grad is None for p in module.parameters())   # frozen: estimator, reward, base
    g2 = torch.Generator().manual_seed(0)
    g2.set_state(state)
    method.soft_q(a.detach(), j, cond, g2)
    assert torch.equal(g2.get_state(), after_bridge)   # exactly the bridge's m n B normals


def test_checkpointed_bridge_gives_the_same_loss_and_gradients():
    """The bridge's noise is drawn outside the checkpoint, so its recomputation in the backward pass is the same."""
    results = []
    for flag in (True, False):
        cfg, task, schedule, params, method = setup(q_samples=2, q_steps=1, checkpoint_estimator=flag)
        x, j, cond, g = batch(task)
        loss, _ = method.loss(x, j, cond, None, g)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    assert sum(float(p.abs().sum()) for p in results[0][1]) > 0
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


# ---- Stable Diffusion, tiny pipeline --------------------------------------------------------------------------
def test_sd_tiny_pipeline_soft_q_through_the_lcm_adapter(tmp_path):
    model = make_tiny_pipeline(tmp_path / "pipeline")
    lcm = make_tiny_lcm_lora(tmp_path / "lcm" / "pytorch_lora_weights.safetensors", model)
    cfg = tiny_sd_config(model, "unused", consistency=str(lcm), reward="rewards_for_tests:image_mean", q_samples=2,
                         q_steps=1)
    task = tasks.build(cfg, torch.device("cpu"))
    schedule = DDIMSchedule.build(task.scheduler_config, cfg.sample_steps)
    params = add_policy_lora(task.unet, task.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    method = SQDF(task, schedule, cfg)
    assert method.estimator_name == "consistency"
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *task.sample_shape), generator=g)
    cond = task.sample_conditions(2, g)
    loss, stats = method.loss(x, torch.tensor([0, 1]), cond, None, g)
    loss.backward()
    assert bool(torch.isfinite(loss)) and 0 < float(stats["reward_q"]) < 1   # image means in [0, 1]
    assert sum(float(p.grad.abs().sum()) for p in params) > 0
    adapter_ids = {id(p) for p in params}
    for module in [task.unet, *task.frozen]:
        for name, p in module.named_parameters():
            assert id(p) in adapter_ids or p.grad is None, name   # the LCM adapter and the VAE stay frozen


# ---- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    ({"q_samples": 0}, "q_samples=0: must be >= 1"),
    ({"q_steps": -1}, "q_steps=-1: must be >= 0"),
    ({"q_samples": 4}, "q_samples=4: needs q_steps >= 1"),
    ({"q_samples": 2, "q_steps": 1, "q_sampler": "ddpm"}, "q_sampler='ddpm': must be one of bridge, renoise"),
])
def test_config_validation_names_the_bad_value(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.validate(config.TrainConfig(**values))
    if "q_sampler" not in values:   # (argparse itself refuses a bad choice)
        with pytest.raises(SystemExit, match=message.split(":")[0]):
            config.parse([f"--{k.replace('_', '-')}={v}" for k, v in values.items()])


# ---- the digits target metrics --------------------------------------------------------------------------------
def test_weighted_distances_reduce_to_the_unweighted_and_the_tilted_target_prefers_tilted_samples():
    from sqdf_fast.metrics import effective_sample_size, energy_distance, frechet_distance
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randn(50, 3, generator=g, dtype=torch.float64)
    equal = torch.full((50,), 3.0, dtype=torch.float64)
    assert frechet_distance(a, b, equal) == pytest.approx(frechet_distance(a, b), rel=1e-9)
    assert energy_distance(a, b, equal) == pytest.approx(energy_distance(a, b), rel=1e-9)
    assert effective_sample_size(equal) == pytest.approx(50)
    # real digits as features (a fixed 8-d projection of the pixels), real rewards = ink; a tilted resample of the
    # real set is nearer the tilted target than the real set itself, and the untilted limit is plain fd
    images, labels = digits.load_data()
    features = images.flatten(1) @ torch.randn(256, 8, generator=g)
    rewards = images.flatten(1).mean(1)
    alpha = 0.02
    weights = torch.cat([torch.softmax(rewards[labels == c] / alpha, 0) for c in range(10)])
    order = torch.cat([torch.nonzero(labels == c).squeeze(1) for c in range(10)])
    picks = torch.multinomial(weights * 0.1, 600, replacement=True, generator=g)   # tilted, every class
    tilted = digits.tilted_target_metrics(features[order][picks], labels[order][picks], features, labels, rewards,
                                          alpha)
    plain = digits.tilted_target_metrics(features, labels, features, labels, rewards, alpha)
    assert tilted["dist_to_target"] < 0.5 * plain["dist_to_target"]
    assert tilted["fd_to_target"] < 0.5 * plain["fd_to_target"]
    assert 1 < plain["target_ess"] < 180 and plain["target_reward"] > float(rewards.mean())
    flat = digits.tilted_target_metrics(features, labels, features, labels, rewards, 1e6)
    assert abs(flat["fd_to_target"]) < 1e-6   # equal weights: the real set against itself
