"""In-memory replay buffer of whole trajectories (docs/method.md §6), a ring of fixed capacity.

Per trajectory: every transition's input latent x^(0..T-1), the condition and the final reward. Memory is
allocated once, so it is bounded by `nbytes`. All sampling runs on the buffer's device with the caller's generator:
no host sync.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sqdf_fast.schedule import step_discounts

SAMPLERS = ("uniform", "newest", "reward-gamma")


class ReplayBuffer:
    def __init__(self, capacity: int, num_steps: int, sample_shape: tuple[int, ...], cond_shape: tuple[int, ...],
                 cond_dtype: torch.dtype, device: torch.device | str, dtype: torch.dtype = torch.float32):
        self.capacity, self.num_steps = capacity, num_steps
        self.states = torch.zeros((capacity, num_steps, *sample_shape), dtype=dtype, device=device)
        self.cond = torch.zeros((capacity, *cond_shape), dtype=cond_dtype, device=device)
        self.reward = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.size = 0   # filled slots
        self.next = 0   # slot the next trajectory goes to

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.states, self.cond, self.reward))

    def add(self, states: Tensor, cond: Tensor, reward: Tensor) -> None:
        """Store a batch of trajectories (B, T, ...), overwriting the oldest when full."""
        n = states.shape[0]
        if n > self.capacity:
            raise ValueError(f"cannot add {n} trajectories to a buffer of capacity {self.capacity}")
        slots = (self.next + torch.arange(n, device=self.states.device)) % self.capacity
        self.states.index_copy_(0, slots, states.to(self.states.dtype))
        self.cond.index_copy_(0, slots, cond.to(self.cond.dtype))
        self.reward.index_copy_(0, slots, reward.float())
        self.next = (self.next + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def clear(self) -> None:
        """Forget every stored trajectory (the memory stays allocated)."""
        self.size = self.next = 0

    def sample(self, n: int, sampler: str, generator: torch.Generator, gamma: float = 1.0,
               importance_weights: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(slots (n,), steps (n,) or None, weights (n,) or None).

        uniform: n distinct trajectories; newest: the n most recently added; both leave the step to the caller.
        reward-gamma: (trajectory, step) pairs with replacement, P(i, j) ~ (r_i - min r + eps) * gamma^(T-1-j),
        the authors' max(r, 0) made valid for rewards of any sign; with importance_weights, weights
        (1 / (size * T)) / P(i, j) make the expected loss that of uniform sampling.
        """
        if self.size == 0 or (n > self.size and sampler != "reward-gamma"):
            raise ValueError(f"cannot sample {n} distinct trajectories from a buffer holding {self.size}")
        device = self.states.device
        if sampler == "uniform":
            return torch.randperm(self.size, generator=generator, device=device)[:n], None, None
        if sampler == "newest":
            return (self.next - 1 - torch.arange(n, device=device)) % self.capacity, None, None
        if sampler != "reward-gamma":
            raise ValueError(f"buffer_sampler={sampler!r}: must be one of {', '.join(SAMPLERS)}")
        reward = self.reward[:self.size]
        finite = torch.isfinite(reward)
        low = torch.where(finite, reward, torch.inf).min().nan_to_num(posinf=0.0)   # 0 when none is finite
        spread = (torch.where(finite, reward, low).max() - low).clamp(min=1e-6)
        priority = torch.where(finite, reward - low, 0.0) + 1e-3 * spread
        step_weight = step_discounts(self.num_steps, gamma, device)
        slots = torch.multinomial(priority, n, replacement=True, generator=generator)
        steps = torch.multinomial(step_weight, n, replacement=True, generator=generator)
        if not importance_weights:
            return slots, steps, None
        prob = (priority / priority.sum())[slots] * (step_weight / step_weight.sum())[steps]
        return slots, steps, 1.0 / (self.size * self.num_steps * prob)

    def state_dict(self) -> dict:
        return {"states": self.states, "cond": self.cond, "reward": self.reward, "size": self.size, "next": self.next}

    def load_state_dict(self, state: dict) -> None:
        for name in ("states", "cond", "reward"):
            if state[name].shape != getattr(self, name).shape:
                raise ValueError(f"buffer {name} has shape {tuple(state[name].shape)} in the checkpoint, "
                                 f"expected {tuple(getattr(self, name).shape)}")
            getattr(self, name).copy_(state[name])
        self.size, self.next = int(state["size"]), int(state["next"])
