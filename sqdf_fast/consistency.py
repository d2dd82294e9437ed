"""Consistency model: a one-step x0 predictor with LCM's boundary parameterisation, and its distillation.

f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(eps_theta(x_t, t)), with sigma_data = 0.5 and timestep scaling 10
(diffusers' LCMScheduler), so f(x, 0) = x and f is the Tweedie estimate of its own epsilon for t >= 1.
Distillation (Song et al. 2023, "consistency distillation") makes f agree along the teacher's DDIM ODE: the student
at x_{t_n} matches an EMA target at x_{t_{n-1}}, one guided DDIM step from the teacher.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

from sqdf_fast import ops
from sqdf_fast.ops import reference

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_scalings(t: Tensor) -> tuple[Tensor, Tensor]:
    scaled = TIMESTEP_SCALING * t.float()
    c_skip = SIGMA_DATA**2 / (scaled.square() + SIGMA_DATA**2)
    c_out = scaled / (scaled.square() + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


def one_step_x0(x: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat from the network's epsilon `eps` at (x_t, t)."""
    return ops.consistency_x0(x, eps, alphas_cumprod[t], *boundary_scalings(t))


class ConsistencyModel(nn.Module):
    """A consistency model with its own network `net` (trained in place by `distill`; a deep copy is its EMA target):
    forward(x, t, cond) -> x0 in one step from the epsilon `eps_fn(net, x, t, cond)`."""

    def __init__(self, net: nn.Module, eps_fn: Callable, alphas_cumprod: Tensor):
        super().__init__()
        self.net = net
        self.eps_fn = eps_fn
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return one_step_x0(x, self.eps_fn(self.net, x, t, cond), t, self.alphas_cumprod)


def distill(teacher_eps: Callable[[Tensor, Tensor, Tensor], Tensor], student: ConsistencyModel, data: Tensor,
            labels: Tensor, alphas_cumprod: Tensor, steps: int, batch: int, lr: float, generator: torch.Generator,
            grid_step: int = 10, ema_decay: float = 0.95,
            log: Callable[[int, float], None] | None = None) -> list[float]:
    """Consistency distillation of `student` from a guided teacher (x, t, cond) -> eps on the grid 1, 1+k, 1+2k...

    Returns the loss history. The student's own weights are trained in place; the target is an EMA copy.
    """
    target = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    grid = torch.arange(1, alphas_cumprod.shape[0], grid_step)
    alphas = alphas_cumprod.float()
    losses = []
    for step in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=generator)
        x0, cond = data[idx], labels[idx]
        n = torch.randint(1, grid.shape[0], (batch,), generator=generator)
        t, s = grid[n], grid[n - 1]
        noise = torch.randn(x0.shape, generator=generator)
        a_t = reference.per_sample(alphas[t], x0)
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
        with torch.no_grad():
            eps = teacher_eps(x_t, t, cond)
            # deterministic DDIM (eta = 0) ODE step from t to s
            x_s = reference.ddim_mean(x_t, eps, alphas[t], alphas[s], 0.0)
            target_x0 = target(x_s, s, cond)
        loss = (student(x_t, t, cond) - target_x0).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for p_target, p in zip(target.parameters(), student.parameters()):
                p_target.lerp_(p, 1 - ema_decay)
        losses.append(loss.detach().item())
        if log is not None:
            log(step, losses[-1])
    return losses
