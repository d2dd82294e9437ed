"""The SQDF micro-step on the digits task: where gradients go, what the reference is, which estimator runs."""
import pytest
import torch

from sqdf_fast import config
from sqdf_fast.adapters import adapters_disabled, add_policy_lora
from sqdf_fast.methods.sqdf import SQDF
from sqdf_fast.ops import reference
from sqdf_fast.schedule import DDIMSchedule
from sqdf_fast.tasks import digits


def setup(**overrides):
    cfg = config.TrainConfig(**overrides)
    task = digits.make_task(cfg)
    schedule = DDIMSchedule.build(task.scheduler_config, cfg.sample_steps)
    params = add_policy_lora(task.unet, task.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    return cfg, task, schedule, params, SQDF(task, schedule, cfg)


def batch(task, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *task.sample_shape), generator=g)
    j = torch.tensor([0, 3, 7, 12, 18, 19])[:n]
    return x, j, task.sample_conditions(n, g), g


def perturb_adapter(params):
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("estimator", ["consistency", "tweedie"])
@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_gradients_reach_only_the_adapter(estimator, guidance):
    cfg, task, schedule, params, method = setup(q_estimator=estimator, guidance=guidance)
    perturb_adapter(params)
    x, j, cond, g = batch(task)
    loss, stats = method.loss(x, j, cond, None, g)
    loss.backward()
    adapter_ids = {id(p) for p in params}
    for module in [task.unet, *task.frozen]:
        for name, p in module.named_parameters():
            if id(p) in adapter_ids:
                continue
            assert p.grad is None, f"gradient reached frozen parameter {name}"
    assert all(p.grad is not None for p in params)
    assert sum(float(p.grad.abs().sum()) for p in params) > 0


def test_reference_is_the_base_model_with_the_adapter_off():
    cfg = config.TrainConfig()
    base = digits.make_task(cfg).unet
    _, task, schedule, params, method = setup()
    x, j, cond, _ = batch(task)
    t = schedule.timesteps[j]
    with torch.no_grad():
        expected = digits.unet_eps(base, x, t, cond)
        torch.testing.assert_close(method.policy_eps(x, t, cond).combined(), expected)   # zero-initialised adapter
        perturb_adapter(params)
        assert not torch.allclose(method.policy_eps(x, t, cond).combined(), expected)
        torch.testing.assert_close(method.reference_eps(x, t, cond).combined(), expected)
        with adapters_disabled(task.unet):
            torch.testing.assert_close(digits.unet_eps(task.unet, x, t, cond), expected)
    assert all(p.requires_grad for p in params)   # re-enabled after the reference call
    n_base = sum(p.numel() for p in base.parameters())
    n_policy = sum(p.numel() for p in task.unet.parameters())
    assert n_policy - n_base == sum(p.numel() for p in params)   # one set of base weights plus the adapter


def test_last_step_uses_the_action_itself():
    cfg, task, schedule, params, method = setup()
    a = torch.randn((3, *task.sample_shape))
    j = torch.tensor([19, 19, 5])
    cond = torch.tensor([1, 2, 3])
    x0 = method.x0_estimate(a, j, cond)
    torch.testing.assert_close(x0[:2], a[:2])
    # the same network on a batch of 1: batched kernels may differ in the last bits
    torch.testing.assert_close(x0[2:], task.consistency(a[2:], schedule.next_timesteps[j[2:]], cond[2:]),
                               atol=1e-4, rtol=1e-4)


def test_checkpointed_estimator_gives_the_same_gradients():
    grads = []
    for flag in (True, False):
        cfg, task, schedule, params, method = setup(checkpoint_estimator=flag)
        torch.manual_seed(0)
        perturb_adapter(params)
        x, j, cond, g = batch(task)
        loss, _ = method.loss(x, j, cond, None, g)
        loss.backward()
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_consistency_model_beats_tweedie_at_high_noise():
    """At high noise the shipped consistency model's one-step x0 is a plausible digit (small Frechet distance to real
    digits in evaluator features) where the base's Tweedie mean is a blur: that is what a reward trained on clean
    digits can judge, and why the consistency model is the default soft-Q estimator."""
    from sqdf_fast.metrics import per_class_fd
    task = digits.make_task(config.TrainConfig())
    schedule = DDIMSchedule.build(task.scheduler_config, 20)
    images, labels = digits.load_data()
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(images.shape[0], generator=g)[:300]
    x0, cond = images[idx], labels[idx]
    real = task.real_features(cond)
    with torch.no_grad():
        for t_value in (951, 851):
            a = schedule.alphas_cumprod[t_value]
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g)
            t = torch.full((x0.shape[0],), t_value)
            tweedie = reference.tweedie_x0(x_t, digits.unet_eps(task.unet, x_t, t, cond), a)
            fd_tweedie = per_class_fd(task.features(tweedie), cond, real)
            fd_consistency = per_class_fd(task.features(task.consistency(x_t, t, cond)), cond, real)
            assert fd_consistency < fd_tweedie, (t_value, fd_consistency, fd_tweedie)


def test_discount_exponent_is_steps_remaining(monkeypatch):
    cfg, task, schedule, params, method = setup()
    seen = {}
    from sqdf_fast import ops
    original = ops.sqdf_loss

    def spy(reward, kl, k, gamma, alpha, weight=None):
        seen.update(k=k, gamma=gamma, alpha=alpha)
        return original(reward, kl, k, gamma, alpha, weight)

    monkeypatch.setattr("sqdf_fast.methods.sqdf.ops.sqdf_loss", spy)
    x, j, cond, g = batch(task)
    method.loss(x, j, cond, None, g)
    assert seen["k"].tolist() == [19, 16, 12, 7, 1, 0]   # T - 1 - j for j = 0, 3, 7, 12, 18, 19 (T = 20)
    assert (seen["gamma"], seen["alpha"]) == (cfg.gamma, cfg.alpha)


def test_each_rank_draws_its_own_noise(monkeypatch):
    from sqdf_fast.train import rank_seed
    seeds = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        seeds.append(rank_seed(0))
    draws = [torch.randn(4, generator=torch.Generator().manual_seed(s)) for s in seeds]
    assert seeds[0] != seeds[1] and not torch.allclose(*draws)


def test_prepare_collects_when_due_and_the_state_round_trips():
    """The trainer's interface: prepare fills the buffer every replay_ratio steps, micro_loss trains on it, and
    state_dict / load_state_dict carry the buffer and the newest samples to a new method that then draws the same."""
    sizes = dict(sample_steps=5, batch_size=8, rollout_batch=8, buffer_size=16, replay_ratio=2)
    cfg, task, schedule, params, method = setup(**sizes)
    perturb_adapter(params)
    g = torch.Generator().manual_seed(0)
    sizes_seen = []
    for step in range(3):
        method.prepare(step, g)
        sizes_seen.append(method.buffer.size)
    assert sizes_seen == [8, 8, 16]   # collected at steps 0 and 2 only
    assert method.fresh["reward"].shape == (8,) and method.fresh["cond"].shape[0] == 8
    state = method.state_dict()
    assert set(state) == {"fresh", "buffer"} and set(state["fresh"]) == {"reward", "cond", "images"}
    other = SQDF(task, schedule, cfg)
    other.load_state_dict(state)
    assert torch.equal(other.buffer.states, method.buffer.states) and other.buffer.next == method.buffer.next
    assert all(torch.equal(other.fresh[k], method.fresh[k]) for k in state["fresh"])
    losses = []
    for m in (method, other):
        loss, stats = m.micro_loss(0, torch.Generator().manual_seed(3))
        assert set(stats) == {"reward_q", "kl_term"} and float(stats["kl_term"]) > 0
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


def test_without_a_buffer_each_step_trains_on_its_own_rollout():
    cfg, task, schedule, params, method = setup(sample_steps=5, batch_size=8, grad_accum=2, buffer=False)
    assert method.buffer is None
    g = torch.Generator().manual_seed(0)
    method.prepare(0, g)
    assert method.state_dict()["buffer"] == {}
    assert method.fresh["states"].shape[:2] == (8, 5)   # batch_size / steps_per_trajectory trajectories
    for micro in range(2):   # micro-batch m trains on its own rows of them
        x, j, cond, weight = method.draw(micro, g)
        assert weight is None and x.shape[0] == 4
        rows = torch.arange(4 * micro, 4 * micro + 4)
        assert torch.equal(cond, method.fresh["cond"][rows]) and torch.equal(x, method.fresh["states"][rows, j])
