"""ReplayBuffer (ring semantics, samplers, checkpointing) and `methods.sqdf.sample_steps`.

The samplers are checked statistically with fixed-seed generators, so every run draws the same numbers; the
thresholds (p = 1e-3) are there to keep the tests meaningful, not to tolerate flakiness.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch.testing import assert_close

from sqdf_fast.buffer import ReplayBuffer
from sqdf_fast.methods.sqdf import sample_steps

F64 = torch.float64
CPU = torch.device("cpu")
MIXED_REWARDS = [-2.0, -0.5, 0.0, 0.7, 3.0, 1.2]

# Upper 1e-3 critical values of chi-square(df): scipy.stats.chi2.isf(1e-3, df), rounded down.
CHI2_CRITICAL = {3: 16.266, 5: 20.515, 6: 22.457, 7: 24.321, 23: 49.728}


def assert_chi_square_fits(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Pearson's goodness-of-fit test of observed category counts against probabilities, at p = 1e-3."""
    counts, probs = counts.to(F64).flatten(), probs.to(F64).flatten()
    expected = probs / probs.sum() * counts.sum()
    assert expected.min() >= 5, "too few draws for the chi-square approximation"
    statistic = float(((counts - expected).square() / expected).sum())
    assert statistic < CHI2_CRITICAL[len(counts) - 1], f"chi-square {statistic:.1f}: counts {counts.tolist()}"


def assert_unbiased(estimates: torch.Tensor, target: float, variance: float) -> None:
    """The mean of n iid draws of known variance lies within 4 standard errors of its expectation."""
    assert abs(float(estimates.mean()) - target) < 4 * math.sqrt(variance / len(estimates))


def discount(num_steps: int, gamma: float) -> torch.Tensor:
    """q(j) proportional to gamma^(T-1-j), normalised, in float64."""
    q = gamma ** torch.arange(num_steps - 1, -1, -1, dtype=F64)
    return q / q.sum()


def make_buffer(capacity: int = 5, num_steps: int = 3, dtype: torch.dtype = torch.float32, sample_shape=(2, 2),
                cond_shape=(3,)) -> ReplayBuffer:
    return ReplayBuffer(capacity, num_steps, sample_shape, cond_shape, torch.long, "cpu", dtype)


def trajectories(buffer: ReplayBuffer, n: int, gen: torch.Generator, reward=None):
    """(states, cond, reward) of n random trajectories shaped for `buffer`."""
    states = torch.randn(n, *buffer.states.shape[1:], generator=gen)
    cond = torch.randint(0, 100, (n, *buffer.cond.shape[1:]), generator=gen)
    reward = torch.randn(n, generator=gen) if reward is None else torch.as_tensor(reward, dtype=torch.float32)
    return states, cond, reward


def buffer_with_rewards(rewards, num_steps: int, copies: int = 1) -> ReplayBuffer:
    """A buffer holding `copies` trajectories of each reward: slot i has reward rewards[i % len(rewards)]."""
    size = len(rewards) * copies
    buffer = make_buffer(capacity=size + 2, num_steps=num_steps, sample_shape=(1,), cond_shape=())
    buffer.add(*trajectories(buffer, size, torch.Generator().manual_seed(0), rewards * copies))
    return buffer


def draw_reward_gamma(buffer: ReplayBuffer, total: int, gen: torch.Generator, gamma: float,
                      importance_weights: bool = False):
    """`total` reward-gamma draws, in calls of buffer.size (the most one call may ask for)."""
    draws = [buffer.sample(buffer.size, "reward-gamma", gen, gamma=gamma, importance_weights=importance_weights)
             for _ in range(-(-total // buffer.size))]
    return [None if parts[0] is None else torch.cat(parts) for parts in zip(*draws)]


def reward_gamma_probs(rewards, num_steps: int, gamma: float) -> torch.Tensor:
    """P(i, j) proportional to (r_i - min r + 1e-3 (max r - min r)) gamma^(T-1-j), min/max over the finite rewards;
    a non-finite reward gets the minimal priority."""
    r = torch.tensor(rewards, dtype=F64)
    finite = r.isfinite()
    low, high = r[finite].min(), r[finite].max()
    priority = torch.where(finite, r - low, 0.0) + 1e-3 * (high - low)
    return torch.outer(priority / priority.sum(), discount(num_steps, gamma))


# ring semantics -----------------------------------------------------------------------------------------------------
def test_ring_overwrites_the_oldest_in_order(gen):
    capacity, num_steps = 5, 3
    buffer = make_buffer(capacity, num_steps)
    # (2*2 float32 states per step, 3 int64 cond, float32 reward) per slot, allocated once
    assert buffer.nbytes == capacity * (num_steps * 4 * 4 + 3 * 8 + 4)
    nbytes = buffer.nbytes
    history = []  # every trajectory ever added, oldest first: trajectory g lives in slot g % capacity
    for n in [2, 2, 3, 5, 1]:
        states, cond, reward = trajectories(buffer, n, gen)
        buffer.add(states, cond, reward)
        history += [(states[i], cond[i], reward[i]) for i in range(n)]
        assert buffer.size == min(len(history), capacity) and buffer.next == len(history) % capacity
        for g in range(max(0, len(history) - capacity), len(history)):
            s, c, r = history[g]
            slot = g % capacity
            assert torch.equal(buffer.states[slot], s) and torch.equal(buffer.cond[slot], c)
            assert buffer.reward[slot] == r
        assert buffer.nbytes == nbytes


def test_too_many_at_once_or_unknown_sampler_raises(gen):
    buffer = make_buffer(capacity=4)
    with pytest.raises(ValueError, match="capacity"):
        buffer.add(*trajectories(buffer, 5, gen))
    assert buffer.size == 0
    buffer.add(*trajectories(buffer, 3, gen))
    for sampler in ("uniform", "newest"):   # distinct trajectories: at most size
        with pytest.raises(ValueError, match="cannot sample 4"):
            buffer.sample(4, sampler, gen)
    slots, _, _ = buffer.sample(4, "reward-gamma", gen, gamma=0.9)   # with replacement: any n
    assert slots.shape == (4,) and int(slots.max()) < 3
    with pytest.raises(ValueError, match="buffer_sampler"):
        buffer.sample(1, "bogus", gen)


# uniform and newest -------------------------------------------------------------------------------------------------
def test_uniform_draws_distinct_filled_slots_equally_often(gen):
    buffer = make_buffer(capacity=10)
    buffer.add(*trajectories(buffer, 7, gen))
    counts = torch.zeros(7)
    for _ in range(1500):
        slots, steps, weights = buffer.sample(3, "uniform", gen)
        assert steps is None and weights is None
        assert len(set(slots.tolist())) == 3 and int(slots.max()) < 7
        counts += torch.bincount(slots, minlength=7)
    # draws within a call are without replacement, which only lowers the statistic: the test stays valid
    assert_chi_square_fits(counts, torch.full((7,), 1 / 7))


def test_newest_returns_the_latest_slots_across_wraparound(gen):
    capacity = 5
    buffer = make_buffer(capacity)
    total = 0
    for n in (3, 4, 2, 5):
        states, cond, reward = trajectories(buffer, n, gen)
        buffer.add(states, cond, reward)
        total += n
        for k in range(1, buffer.size + 1):
            slots, steps, weights = buffer.sample(k, "newest", gen)
            assert slots.tolist() == [(total - 1 - i) % capacity for i in range(k)]
            assert steps is None and weights is None
        # newest first: the batch just added, in reverse
        assert torch.equal(buffer.states[buffer.sample(n, "newest", gen)[0]], states.flip(0))


# reward-gamma ------------------------------------------------------------------------------------------------------
def test_reward_gamma_joint_distribution(gen):
    num_steps, gamma, copies = 4, 0.7, 50
    kinds = len(MIXED_REWARDS)
    buffer = buffer_with_rewards(MIXED_REWARDS, num_steps, copies)
    slots, steps, weights = draw_reward_gamma(buffer, 200_000, gen, gamma)
    assert weights is None and int(slots.max()) < buffer.size and int(steps.max()) < num_steps
    probs = reward_gamma_probs(MIXED_REWARDS, num_steps, gamma)  # of (reward kind, step): all kinds have 50 slots
    kind = slots % kinds
    assert_chi_square_fits(torch.bincount(kind * num_steps + steps, minlength=kinds * num_steps), probs)
    assert_chi_square_fits(torch.bincount(kind, minlength=kinds), probs.sum(1))
    assert_chi_square_fits(torch.bincount(steps, minlength=num_steps), probs.sum(0))


def test_reward_gamma_nonfinite_rewards_get_the_minimal_priority(gen):
    rewards = [math.nan, 1.0, math.inf, -math.inf, -1.0, 2.0]
    num_steps, copies = 3, 50
    buffer = buffer_with_rewards(rewards, num_steps, copies)
    slots, steps, weights = draw_reward_gamma(buffer, 100_000, gen, 0.9, importance_weights=True)
    probs = reward_gamma_probs(rewards, num_steps, 0.9)
    p_kind = probs.sum(1)
    assert p_kind[0] == p_kind[2] == p_kind[3] == p_kind[4] == p_kind.min()  # nan, inf, -inf, min finite
    assert weights.isfinite().all()
    kind = slots % len(rewards)
    assert_close(weights.to(F64), 1 / (buffer.size * num_steps) / (probs[kind, steps] / copies), rtol=1e-5, atol=0)
    assert_chi_square_fits(torch.bincount(kind, minlength=len(rewards)), p_kind)


def test_reward_gamma_with_only_nonfinite_rewards(gen):
    buffer = buffer_with_rewards([math.nan, math.inf, math.nan], num_steps=2)
    slots, _, _ = buffer.sample(3, "reward-gamma", gen, gamma=0.9)
    assert int(slots.max()) < 3


def test_reward_gamma_importance_weights_give_the_uniform_mean(gen):
    num_steps, gamma, copies = 4, 0.7, 50
    buffer = buffer_with_rewards(MIXED_REWARDS, num_steps, copies)
    slots, steps, weights = draw_reward_gamma(buffer, 200_000, gen, gamma, importance_weights=True)
    kind = slots % len(MIXED_REWARDS)
    probs = reward_gamma_probs(MIXED_REWARDS, num_steps, gamma)  # of (reward kind, step)
    uniform = 1 / (len(MIXED_REWARDS) * num_steps)               # of (reward kind, step) under uniform sampling
    assert_close(weights.to(F64), uniform / probs[kind, steps], rtol=1e-5, atol=0)

    # f depends on the reward and the step; it favours what the sampler disfavours (early steps, negative
    # rewards), so a bias would show
    f = torch.arange(num_steps, dtype=F64) - 2.0 * (torch.tensor(MIXED_REWARDS, dtype=F64) < 0)[:, None]
    uniform_mean = float(f.mean())
    variance = float((uniform ** 2 * f.square() / probs).sum()) - uniform_mean ** 2  # of w f under P
    assert_unbiased(weights.to(F64) * f[kind, steps], uniform_mean, variance)
    with pytest.raises(AssertionError):  # the unweighted mean is far off: the check has power
        assert_unbiased(f[kind, steps], uniform_mean, variance)


# checkpointing and storage dtype -----------------------------------------------------------------------------------
def test_state_dict_round_trip(gen):
    buffer = make_buffer(capacity=5)
    for n in (3, 4):  # wrapped around: next = 2
        buffer.add(*trajectories(buffer, n, gen))
    blob = io.BytesIO()
    torch.save(buffer.state_dict(), blob)
    blob.seek(0)
    fresh = make_buffer(capacity=5)
    fresh.load_state_dict(torch.load(blob))
    for name in ("states", "cond", "reward"):
        assert torch.equal(getattr(fresh, name), getattr(buffer, name)), name
    assert (fresh.size, fresh.next) == (buffer.size, buffer.next) == (5, 2)
    # the loaded ring carries on where the saved one stopped
    batch = trajectories(buffer, 2, gen)
    buffer.add(*batch)
    fresh.add(*batch)
    assert torch.equal(fresh.states, buffer.states) and fresh.next == buffer.next == 4


@pytest.mark.parametrize("other", [dict(capacity=6), dict(num_steps=4), dict(sample_shape=(2, 3)),
                                   dict(cond_shape=(2,))], ids=str)
def test_load_state_dict_of_another_shape_raises(other):
    state = make_buffer(capacity=5).state_dict()
    with pytest.raises(ValueError, match="shape"):
        make_buffer(**{"capacity": 5, **other}).load_state_dict(state)


def test_bfloat16_storage(gen):
    buffer = make_buffer(capacity=4, dtype=torch.bfloat16)
    states, cond, reward = trajectories(buffer, 3, gen)
    buffer.add(states, cond, reward)
    assert buffer.states.dtype == torch.bfloat16
    assert torch.equal(buffer.states[:3], states.to(torch.bfloat16))  # stored rounded ...
    assert not torch.equal(buffer.states[:3].float(), states)          # ... which float32 randoms are not
    assert buffer.reward[:3].tolist() == reward.tolist()
    assert buffer.nbytes == 4 * (3 * 4 * 2 + 3 * 8 + 4)
    slots, _, _ = buffer.sample(2, "uniform", gen)
    assert buffer.states[slots].dtype == torch.bfloat16


# methods.sqdf.sample_steps -------------------------------------------------------------------------------------------
def test_sample_steps_uniform(gen):
    steps, weights = sample_steps(40_000, 8, "uniform", 0.9, gen, CPU)
    assert weights is None and steps.dtype == torch.long
    assert 0 <= int(steps.min()) and int(steps.max()) < 8
    assert_chi_square_fits(torch.bincount(steps, minlength=8), torch.full((8,), 1 / 8))


def test_sample_steps_discounted(gen):
    num_steps, gamma, n = 8, 0.8, 100_000
    steps, weights = sample_steps(n, num_steps, "discounted", gamma, gen, CPU)
    q = discount(num_steps, gamma)
    assert_chi_square_fits(torch.bincount(steps, minlength=num_steps), q)
    assert_close(weights.to(F64), 1 / num_steps / q[steps], rtol=1e-5, atol=0)
    f = (torch.arange(num_steps, dtype=F64) - 5.0).square()  # large on the rarely drawn early steps
    uniform_mean = float(f.mean())
    variance = float((f.square() / num_steps ** 2 / q).sum()) - uniform_mean ** 2
    assert_unbiased(weights.to(F64) * f[steps], uniform_mean, variance)
    with pytest.raises(AssertionError):
        assert_unbiased(f[steps], uniform_mean, variance)
