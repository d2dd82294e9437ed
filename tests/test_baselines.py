"""The baselines (sqdf_fast/methods/baselines.py) on the digits task: where each one's gradient flows, that their
chains are the sampler's, that each trains end to end through the trainer's one method interface, and that their
options are checked."""
import json

import pytest
import torch
from safetensors.torch import load_file

from sqdf_fast import config
from sqdf_fast.adapters import add_policy_lora
from sqdf_fast.methods import METHODS, build
from sqdf_fast.methods.baselines import ChainMethod, alignprop_range, host_randint, refl_range
from sqdf_fast.methods.sqdf import SQDF
from sqdf_fast.ops import reference
from sqdf_fast.rollout import rollout
from sqdf_fast.schedule import DDIMSchedule
from sqdf_fast.tasks import resolve
from sqdf_fast.train import run

T, B = 6, 3
BASELINES = ("draft", "draft-lv", "refl", "alignprop", "draft-kl")


def setup(method="draft", perturb=False, **overrides):
    cfg = config.TrainConfig(method=method, sample_steps=T, **overrides)
    config.validate(cfg)
    task = resolve(cfg.task)(cfg)
    schedule = DDIMSchedule.build(task.scheduler_config, cfg.sample_steps)
    params = add_policy_lora(task.unet, task.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    if perturb:   # move the adapter off zero, so that policy and reference differ
        with torch.no_grad():
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return cfg, task, schedule, build(task, schedule, cfg)


def inputs(task, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = task.sample_conditions(B, g)
    return cond, torch.randn((B, *task.sample_shape), generator=g), g


class Recorder:
    """Wraps the task's denoiser: every call's (transition, input, epsilon output), in order."""

    def __init__(self, task, schedule):
        self.calls, self.inner = [], task.eps
        self.index = {int(t): j for j, t in enumerate(schedule.timesteps)}
        task.eps = self

    def __call__(self, x, t, cond):
        call = [self.index[int(t[0])], x, None]
        self.calls.append(call)   # before the call: a checkpoint's recomputation stops early, inside it
        call[2] = self.inner(x, t, cond)
        return call[2]

    def trained(self, loss):
        """Transitions j with d loss / d eps_j != 0, over the calls made so far (each call once)."""
        tracked = [(j, out) for j, _, out in self.calls if out is not None and out.requires_grad]
        grads = torch.autograd.grad(loss, [out for _, out in tracked], allow_unused=True, retain_graph=True)
        return [j for (j, _), g in zip(tracked, grads) if g is not None and bool(g.abs().sum() > 0)]


def test_registry_matches_the_config_choices():
    assert tuple(METHODS) == config.FIELDS["method"].metadata["choices"]
    assert set(METHODS) == {"sqdf", *BASELINES}
    for name in BASELINES:   # on-policy chains, no buffer
        assert issubclass(METHODS[name][0], ChainMethod)
    assert METHODS["sqdf"][0] is SQDF   # replayed states
    for name, (cls, line) in METHODS.items():
        assert line in config.FIELDS["method"].metadata["help"], name
        _, task, schedule, method = setup(name)
        assert type(method) is cls
    with pytest.raises(ValueError, match="method='ppo'"):
        build(task, schedule, config.TrainConfig(method="ppo"))


@pytest.mark.parametrize("k", [1, 3])
def test_draft_trains_the_last_k_transitions(k):
    _, task, schedule, method = setup("draft", draft_k=k)
    recorder = Recorder(task, schedule)
    loss, reward_q, kl_term, (images, reward) = method.chain_loss(*inputs(task))
    assert recorder.trained(loss) == list(range(T - k, T))
    assert [j for j, _, out in recorder.calls] == list(range(T))   # one policy forward per transition, no reference
    assert kl_term is None and reward.shape == (B,) and images.shape[0] == B
    torch.testing.assert_close(loss.detach(), -reward.mean())
    torch.testing.assert_close(reward_q, reward)   # trained on the sample itself


def test_draft_lv_reruns_the_last_transition_on_fresh_renoisings():
    n = 3
    _, task, schedule, method = setup("draft-lv", lv_samples=n)
    recorder = Recorder(task, schedule)
    loss, reward_q, kl_term, (images, reward) = method.chain_loss(*inputs(task))
    calls = recorder.calls
    assert [j for j, _, _ in calls] == list(range(T)) + [T - 1]   # the chain, then the n copies in one batch
    (_, x_last, _), (_, renoised, extra) = calls[T - 1], calls[T]
    assert extra.requires_grad and renoised.shape[0] == n * B
    assert recorder.trained(loss) == [T - 1, T - 1]   # the model's own epsilon on the copies, not a stale one
    copies = renoised.view(n, B, *renoised.shape[1:])
    assert not torch.allclose(copies[0], copies[1]) and not torch.allclose(copies[0], x_last)   # fresh noise
    # the copies are x_0 re-noised to the last transition's input level
    a = schedule.alpha_t[T - 1]
    x0 = images.detach()   # digits decodes to the latent itself
    noise = (copies - a.sqrt() * x0) / (1 - a).sqrt()
    assert 0.5 < float(noise.std()) < 1.5
    # the loss averages the reward over all n + 1 samples, not only the chain's own
    assert kl_term is None and reward_q.shape == ((n + 1) * B,) and reward.shape == (B,)
    torch.testing.assert_close(loss.detach(), -reward_q.mean())
    assert float(reward_q.detach().mean()) != pytest.approx(float(reward.detach().mean()))


@pytest.mark.parametrize("k", [1, T - 2, T - 1])
def test_refl_trains_transition_k_and_the_matching_estimate(k):
    _, task, schedule, method = setup("refl", refl_lo=k, refl_hi=k)
    recorder = Recorder(task, schedule)
    cond, x_T, g = inputs(task)
    loss, reward_q, _, _ = method.chain_loss(cond, x_T, g)
    assert [j for j, _, _ in recorder.calls] == list(range(T))   # the estimate's forward is the next transition's
    assert recorder.trained(loss) == ([k, k + 1] if k < T - 1 else [k])
    if k < T - 1:
        # x0_hat is Tweedie of the policy's epsilon at x^(K+1) with the timestep x^(K+1) is at (t_{K+1}, not t_K)
        _, x, eps = recorder.calls[k + 1]
        x0_hat = reference.tweedie_x0(x, eps, schedule.alpha_t[k + 1])
        torch.testing.assert_close(reward_q, task.reward(x0_hat, cond))
    torch.testing.assert_close(loss.detach(), -reward_q.mean())


def test_refl_stop_is_uniform_over_its_range():
    g = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(600):
        draws.append(host_randint(g, 2, 5))
        torch.randn(1, generator=g)   # the chain's own draws move the state on
    counts = torch.bincount(torch.tensor(draws), minlength=6)
    assert counts[:2].sum() == 0 and (counts[2:] > 110).all()
    again = torch.Generator().manual_seed(0)
    assert host_randint(again, 2, 5) == draws[0]   # reproducible from the generator state


def test_alignprop_trains_the_last_k_with_checkpointing():
    k = 2
    _, task, schedule, method = setup("alignprop", alignprop_min_k=k, alignprop_max_k=k)
    recorder = Recorder(task, schedule)
    loss, _, _, _ = method.chain_loss(*inputs(task))
    assert recorder.trained(loss) == list(range(T - k, T))
    before = len(recorder.calls)
    loss.backward()
    # every policy forward with gradient is checkpointed: the backward pass into the adapter recomputes exactly those
    assert [j for j, _, _ in recorder.calls[before:]] == list(range(T - 1, T - k - 1, -1))


def test_alignprop_default_range_is_the_whole_chain():
    cfg = config.TrainConfig(method="alignprop", sample_steps=T)
    assert alignprop_range(cfg) == (1, T)


@pytest.mark.parametrize("k", [1, 2])
def test_draft_kl_reward_gradient_last_k_and_kl_gradient_everywhere(k):
    for alpha, expected in ((0.0, list(range(T - k, T))), (0.5, list(range(T)))):
        _, task, schedule, method = setup("draft-kl", perturb=True, draft_k=k, alpha=alpha)
        recorder = Recorder(task, schedule)
        loss, reward_q, kl_term, (_, reward) = method.chain_loss(*inputs(task))
        assert recorder.trained(loss) == expected, alpha
        with_grad = [j for j, _, out in recorder.calls if out.requires_grad]
        without = [j for j, _, out in recorder.calls if not out.requires_grad]
        assert with_grad == list(range(T)) and without == list(range(T))   # one policy + one reference per step
        assert kl_term.shape == (B,) and float(kl_term.detach().mean()) > 0
        torch.testing.assert_close(reward_q, reward)
        expected_loss = (-reward + alpha * kl_term).mean()
        torch.testing.assert_close(loss.detach(), expected_loss)


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_chain_without_gradient_is_the_rollout(guidance):
    cfg, task, schedule, method = setup(perturb=True, guidance=guidance)
    cond, x_T, g = inputs(task)
    with torch.no_grad():
        end = method.chain(x_T, cond, g, grad_from=T)
    _, expected, _ = rollout(method.policy_eps, schedule, x_T, cond, cfg.eta, inputs(task)[2])
    torch.testing.assert_close(end.x, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", BASELINES)
def test_each_method_samples_what_the_rollout_samples(name):
    """Through the trainer's interface: micro_loss draws (cond, x_T) as `inputs` does, and `fresh` holds the chain's
    final samples, those of the sampler."""
    cfg, task, schedule, method = setup(name, perturb=True, refl_lo=1, refl_hi=1, batch_size=2 * B, grad_accum=2)
    cond, x_T, _ = inputs(task)
    g = torch.Generator().manual_seed(0)   # the trainer's generator, as `inputs` seeds it
    method.prepare(0, g)
    _, stats = method.micro_loss(0, g)
    assert method.fresh is None   # the step's samples are complete after its last micro-batch
    _, expected, _ = rollout(method.policy_eps, schedule, x_T, cond, cfg.eta, inputs(task)[2])
    second = method.micro_loss(1, g)[1]
    fresh = method.fresh
    assert fresh["images"].shape[0] == fresh["reward"].shape[0] == fresh["cond"].shape[0] == 2 * B
    torch.testing.assert_close(fresh["images"][:B], task.decode(expected), rtol=1e-5, atol=1e-5)
    assert not fresh["images"].requires_grad and torch.equal(fresh["cond"][:B], cond)
    torch.testing.assert_close(fresh["reward"][:B], task.reward(fresh["images"][:B], cond))
    for s in (stats, second):
        assert set(s) == {"reward_q", "kl_term"} and s["reward_q"].shape == s["kl_term"].shape == ()
        assert (float(s["kl_term"]) > 0) == (name == "draft-kl")


@pytest.mark.parametrize("name", BASELINES)
def test_short_training_run(tmp_path, name):
    cfg = config.TrainConfig(method=name, out=str(tmp_path / "run"), steps=2, batch_size=4, grad_accum=2,
                             eval_per_class=2, sample_steps=4, log_every=1, progress=False)
    config.validate(cfg)
    summary = run(cfg)
    out = tmp_path / "run"
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2]
    assert all(k in r for r in trained for k in ("reward", "reward_q", "kl_term", "diversity"))
    assert all(r["kl_term"] == 0 for r in trained) or name == "draft-kl"
    assert summary["path_kl_final"] > 0   # the policy moved


def test_resumed_refl_run_draws_the_same_stops(tmp_path):
    """ReFL's random stop comes from the generator state, which the checkpoint restores."""
    def cfg(out, steps):
        return config.TrainConfig(method="refl", refl_lo=0, out=str(out), steps=steps, batch_size=4, grad_accum=2,
                                  eval_per_class=2, sample_steps=6, log_every=1, checkpoint_every=1, progress=False)
    run(cfg(tmp_path / "a", 3))
    run(cfg(tmp_path / "b", 2))
    resumed, resume_dir = config.parse(["--resume", str(tmp_path / "b"), "--steps", "3"])
    run(resumed, resume_dir)
    a = load_file(str(tmp_path / "a/checkpoint/adapter.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoint/adapter.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", BASELINES)
def test_short_run_on_gmm2d_raises_the_reward(tmp_path, name):
    """12 steps on the 2-D ring (the task's own defaults otherwise). DRaFT+KL's reward gradient passes only through
    the last transition, where the sample moves by c_j = -0.008 per unit of epsilon while the KL costs
    (c_j / sigma_j)^2 = 1.2 per unit: it needs a small alpha to move at all (at the task's alpha = 1 it stays put)."""
    cfg = config.from_dict({"task": "gmm2d", "method": name, "out": str(tmp_path / "run"), "steps": 12,
                            "sample_steps": 10, "batch_size": 32, "lr": 1e-2, "alpha": 1e-3, "eval_per_class": 256,
                            "log_every": 12, "checkpoint_every": 12, "progress": False}, "test")
    config.validate(cfg)
    summary = run(cfg)
    assert summary["reward_final"] > summary["reward_base"] + 0.1, summary


@pytest.mark.parametrize("args, name", [
    (["--draft-k", "0"], "draft_k"), (["--draft-k", "21"], "draft_k"), (["--lv-samples", "0"], "lv_samples"),
    (["--refl-hi", "20"], "refl_hi"), (["--refl-lo", "20"], "refl_lo"),
    (["--refl-lo", "-1", "--refl-hi", "-2"], "refl_lo"), (["--refl-lo", "12", "--refl-hi", "10"], "refl_lo"),
    (["--alignprop-min-k", "0"], "alignprop_min_k"), (["--alignprop-min-k", "21"], "alignprop_min_k"),
    (["--alignprop-max-k", "21"], "alignprop_max_k"),
    (["--alignprop-min-k", "5", "--alignprop-max-k", "3"], "alignprop_max_k"),
])
def test_bad_baseline_options_are_one_clear_line(tmp_path, args, name):
    with pytest.raises(SystemExit) as err:
        config.parse(args + ["--sample-steps", "20", "--out", str(tmp_path / "run")])
    message = str(err.value)
    assert message.startswith(f"error: {name}=") and "\n" not in message


def test_refl_range_counts_negative_indices_from_the_end():
    assert refl_range(config.TrainConfig(sample_steps=20)) == (14, 19)   # the last 30 %
    assert refl_range(config.TrainConfig(sample_steps=4)) == (0, 3)      # clipped to the chain
    assert refl_range(config.TrainConfig(sample_steps=20, refl_lo=3, refl_hi=-2)) == (3, 18)
