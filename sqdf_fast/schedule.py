"""DDIM sampling schedule as device tables, so a step gathers its coefficients without a host sync.

Transition j (0..T-1) maps x^(j) at timestep t_j to x^(j+1) at t_{j+1} = t_j - 1000/T; the last one lands on
timestep 0 with alpha_prev = alphas_cumprod[0] (diffusers' `set_alpha_to_one=False`). The tables are built by
diffusers' own DDIMScheduler, so they match it exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from sqdf_fast.ops.reference import ddim_sigma


@dataclass
class DDIMSchedule:
    timesteps: Tensor       # (T,) long: t_j
    next_timesteps: Tensor  # (T,) long: t_{j+1}, 0 after the last transition
    alpha_t: Tensor         # (T,) cumulative alpha at t_j
    alpha_prev: Tensor      # (T,) cumulative alpha at t_{j+1}
    alphas_cumprod: Tensor  # (num_train_timesteps,) for training-time noising

    @classmethod
    def build(cls, scheduler_config: dict, num_steps: int, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> "DDIMSchedule":
        scheduler = DDIMScheduler.from_config(scheduler_config)
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError("only epsilon-prediction schedulers are supported (prediction_type='epsilon')")
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.long()
        step = scheduler.config.num_train_timesteps // num_steps
        next_timesteps = (timesteps - step).clamp(min=0)
        alphas = scheduler.alphas_cumprod.to(torch.float64)
        alpha_prev = torch.where(timesteps - step >= 0, alphas[next_timesteps],
                                 torch.as_tensor(float(scheduler.final_alpha_cumprod), dtype=torch.float64))
        table = cls(timesteps, next_timesteps, alphas[timesteps], alpha_prev, alphas)
        if not bool(((table.alpha_t > 0) & (table.alpha_t <= 1) & (table.alpha_prev > 0)
                     & (table.alpha_prev <= 1)).all()):
            raise ValueError("scheduler_config gives cumulative alphas outside (0, 1]")
        return table.to(device, dtype)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "DDIMSchedule":
        return DDIMSchedule(self.timesteps.to(device), self.next_timesteps.to(device),
                            self.alpha_t.to(device, dtype), self.alpha_prev.to(device, dtype),
                            self.alphas_cumprod.to(device, dtype))

    def sigma(self, eta: float) -> Tensor:
        """(T,) DDIM noise scale sigma_j for stochasticity eta."""
        return ddim_sigma(self.alpha_t, self.alpha_prev, eta)


def step_discounts(num_steps: int, gamma: float, device: torch.device | str) -> Tensor:
    """(T,) float32 gamma^(T-1-j) for j = 0..T-1: k = T-1-j transitions remain after the trained one."""
    k = torch.arange(num_steps - 1, -1, -1, device=device, dtype=torch.float32)
    return torch.pow(torch.tensor(gamma, device=device), k)
