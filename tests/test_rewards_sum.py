"""Weighted sums of rewards, `--reward NAME=W,NAME=W,...` with `--reward-weights NAME=PATH,...`: each term built
once, the value against the terms built alone, float64 gradients, the task's wrappers, the syntax errors before any
work, and each term logged by the trainer's evaluation."""
import json

import pytest
import rewards_for_tests
import torch
from test_rewards import PROMPTS, images_01, make_weights, pixel_gradcheck

from sqdf_fast import config, rewards
from sqdf_fast.memory import Checkpointed
from sqdf_fast.rewards import RewardSum, build_reward, parse_sum, reward_terms
from sqdf_fast.train import run


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_weights(tmp_path_factory.mktemp("sum_weights"))


def test_sum_is_the_weighted_sum_of_its_terms_each_built_once(weights, monkeypatch):
    alone = {name: build_reward(name, weights=str(weights), prompts=PROMPTS) for name in ("aesthetic", "clip-score")}
    built = []
    for name in ("load_aesthetic", "load_clip_score"):
        loader = getattr(rewards, name)
        monkeypatch.setattr(rewards, name, lambda *a, _f=loader, _n=name, **k: built.append(_n) or _f(*a, **k))
    spec = "aesthetic=1, clip-score=-0.5,rewards_for_tests:image_mean=2"
    reward = build_reward(spec, weights=f"aesthetic={weights},clip-score={weights}", prompts=PROMPTS)
    assert built == ["load_aesthetic", "load_clip_score"]
    assert isinstance(reward, RewardSum) and len(reward.networks) == 2 and not reward.training
    reward.train()
    assert not reward.training and not any(m.training for m in reward.modules())
    images, cond = images_01(4), torch.tensor([3, 0, 2, 1])
    with torch.no_grad():
        got = reward(images, cond)
        terms = {"aesthetic": alone["aesthetic"](images, cond), "clip-score": alone["clip-score"](images, cond),
                 "rewards_for_tests:image_mean": rewards_for_tests.image_mean(images, cond)}
    assert built == ["load_aesthetic", "load_clip_score"]   # never again
    torch.testing.assert_close(got, terms["aesthetic"] - 0.5 * terms["clip-score"]
                               + 2 * terms["rewards_for_tests:image_mean"])
    assert reward_terms(reward).keys() == terms.keys()
    for name, value in terms.items():
        torch.testing.assert_close(reward_terms(reward)[name], value)
    # through the wrappers a task puts around its reward (sd: Checkpointed; a user's: an object holding it as fn)
    wrapped = Checkpointed(type("Checked", (), {"fn": reward})(), True)
    assert reward_terms(wrapped).keys() == terms.keys()
    assert reward_terms(alone["aesthetic"]) == {} and reward_terms(rewards_for_tests.image_mean) == {}


def test_sum_gradient(weights):
    reward = build_reward("aesthetic=0.3,clip-score=0.01", weights=f"aesthetic={weights},clip-score={weights}",
                          prompts=PROMPTS).double()
    pixel_gradcheck(reward, images_01(2, 24, 40), torch.tensor([1, 3]))


def test_sum_with_the_task_reward_inside_the_tasks_checkpointing():
    """The task term is the task's own reward, not its Checkpointed wrapper, which then holds the sum (no loop)."""
    own = build_reward("digits")
    wrapper = Checkpointed(own, True)
    reward = build_reward("task=1,rewards_for_tests:image_mean=0.5", task_reward=wrapper)
    assert reward.rewards[0] is own
    wrapper.fn = reward   # what Task.replace_reward does
    images = (torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)
    cond = torch.arange(3)
    value = wrapper(images, cond)
    torch.testing.assert_close(value, own(images, cond) + 0.5 * images.flatten(1).mean(1))
    value.sum().backward()
    assert images.grad.abs().sum() > 0


@pytest.mark.parametrize("spec, message", [
    ("aesthetic=one", r"'aesthetic=one' is not NAME=WEIGHT"),
    ("aesthetic=1,hps", r"'hps' is not NAME=WEIGHT"),
    ("aesthetic=inf", r"finite weights"),
    ("=1", r"'=1' is not NAME=WEIGHT"),
    ("aesthetics=1", r"unknown reward 'aesthetics' in the sum; built-in: task, digits, aesthetic, clip-score, "
                     r"pickscore, hps, or module:function"),
    ("digits=1,digits=2", r"'digits' is named twice"),
])
def test_sum_syntax_errors_before_any_work(spec, message):
    with pytest.raises(ValueError, match=message):
        config.validate(config.TrainConfig(reward=spec))
    with pytest.raises(ValueError, match=message):
        build_reward(spec)


def test_sum_weights_errors(weights):
    def validate(reward, reward_weights):
        config.validate(config.TrainConfig(reward=reward, reward_weights=reward_weights))

    assert parse_sum("aesthetic=1,hps=0.5") == [("aesthetic", 1.0), ("hps", 0.5)]
    assert parse_sum("aesthetic") is None and parse_sum("my.module:fn") is None
    validate("aesthetic=1,digits=0.5", f"aesthetic={weights}")   # digits takes the shipped weights
    with pytest.raises(ValueError, match=r"the term 'clip-score' of reward='aesthetic=1,clip-score=1' needs weights"):
        validate("aesthetic=1,clip-score=1", f"aesthetic={weights}")
    with pytest.raises(ValueError, match=r"takes each term's weights as NAME=PATH,NAME=PATH,\.\.\. with NAME one "
                                         r"of aesthetic, clip-score; '.*' is not"):
        validate("aesthetic=1,clip-score=1", str(weights))   # a bare path: which term's?
    with pytest.raises(ValueError, match=r"NAME one of aesthetic, digits; 'hps=/x' is not"):
        validate("aesthetic=1,digits=1", f"aesthetic={weights},hps=/x")
    with pytest.raises(ValueError, match=r"'aesthetic' is named twice"):
        validate("aesthetic=1,digits=1", f"aesthetic={weights},aesthetic={weights}")
    with pytest.raises(ValueError, match=r"the term 'rewards_for_tests:image_mean' of .* takes no weights"):
        validate("aesthetic=1,rewards_for_tests:image_mean=1", f"aesthetic={weights},rewards_for_tests:image_mean=/x")
    with pytest.raises(ValueError, match=r"reward_weights='/absent': no such folder"):
        validate("aesthetic=1,digits=1", "aesthetic=/absent")
    with pytest.raises(ValueError, match="no reward.safetensors there"):
        validate("aesthetic=1,digits=1", f"aesthetic={weights},digits={weights}")


def test_sum_terms_logged_by_the_trainer(tmp_path):
    """Each term's mean over the evaluation samples joins metrics.jsonl (eval_reward_NAME) and summary.json
    (reward_NAME_base, reward_NAME_final); the reward is their weighted sum."""
    cfg = config.TrainConfig(out=str(tmp_path / "run"), steps=1, batch_size=4, rollout_batch=4, buffer_size=4,
                             sample_steps=3, eval_per_class=2, log_every=1, checkpoint_every=1, progress=False,
                             reward="task=1,digits=0.5")
    config.validate(cfg)
    summary = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval_reward" in row]
    assert [row["step"] for row in evals] == [0, 1]
    for row in evals:
        assert row["eval_reward"] == pytest.approx(row["eval_reward_task"] + 0.5 * row["eval_reward_digits"])
    assert row["eval_reward_task"] == pytest.approx(row["eval_reward_digits"])   # the same classifier twice
    assert summary["reward_digits_final"] == pytest.approx(evals[-1]["eval_reward_digits"])
    assert summary["reward_task_base"] == pytest.approx(evals[0]["eval_reward_task"])
