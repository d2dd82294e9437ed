"""Classifier-free-guided denoiser calls and the no-grad DDIM rollout."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from sqdf_fast.ops import reference
from sqdf_fast.schedule import DDIMSchedule

# (x, t, cond) -> epsilon, with t a (B,) long tensor of timesteps
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]


def guided_eps(denoiser: Denoiser, x: Tensor, t: Tensor, cond: Tensor, null_cond: Tensor, guidance: float) -> Tensor:
    """eps_u + w (eps_c - eps_u) from one doubled [uncond; cond] batch; only the conditional branch when w = 1."""
    if guidance == 1.0:
        return denoiser(x, t, cond)
    eps_u, eps_c = denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null_cond, cond])).chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@torch.no_grad()
def rollout(denoiser: Callable[[Tensor, Tensor, Tensor], Tensor], schedule: DDIMSchedule, x_T: Tensor, cond: Tensor,
            eta: float, generator: torch.Generator | None,
            reference_denoiser: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None, first_step: int = 0
            ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Sample DDIM transitions first_step..T-1 from x_T (the state at t_{first_step}) with guided denoisers
    (x, t, cond) -> eps.

    Returns (states (B, T - first_step, ...): the input x^(j) of every transition, the final sample x^(T),
    path_kl (B,) or None).
    path_kl is the true Gaussian KL of the whole chain to the reference chain along these states, in nats:
    sum_j sum_d (mu - mu_ref)^2 / (2 sigma_j^2).
    """
    batch = x_T.shape[0]
    sigma = schedule.sigma(eta)
    states = torch.empty((batch, schedule.num_steps - first_step) + tuple(x_T.shape[1:]), dtype=x_T.dtype,
                         device=x_T.device)
    path_kl = torch.zeros(batch, dtype=torch.float32, device=x_T.device) if reference_denoiser is not None else None
    x = x_T
    for j in range(first_step, schedule.num_steps):
        states[:, j - first_step] = x
        t = schedule.timesteps[j].expand(batch)
        eps = denoiser(x, t, cond)
        mu = reference.ddim_mean(x, eps, schedule.alpha_t[j], schedule.alpha_prev[j], sigma[j])
        if path_kl is not None:
            mu_ref = reference.ddim_mean(x, reference_denoiser(x, t, cond), schedule.alpha_t[j],
                                         schedule.alpha_prev[j], sigma[j])
            path_kl += (mu - mu_ref).square().reshape(batch, -1).sum(1).float() / (2 * sigma[j].square())
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = mu + sigma[j] * noise
    return states, x, path_kl
