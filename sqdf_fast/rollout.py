"""Classifier-free-guided denoiser calls and the no-grad DDIM rollout."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from sqdf_fast import ops
from sqdf_fast.ops import reference
from sqdf_fast.schedule import DDIMSchedule


class GuidedEps(NamedTuple):
    """A guided epsilon kept as its two branches, so that the fused step reads each once."""
    cond: Tensor
    uncond: Tensor | None      # None when guidance is 1: the conditional branch alone
    guidance: float

    def combined(self) -> Tensor:
        return reference.guidance(self.cond, self.uncond, self.guidance)


# (x, t, cond) -> epsilon, with t a (B,) long tensor of timesteps
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]
GuidedDenoiser = Callable[[Tensor, Tensor, Tensor], GuidedEps]


def guided_eps(denoiser: Denoiser, x: Tensor, t: Tensor, cond: Tensor, null_cond: Tensor,
               guidance: float) -> GuidedEps:
    """Both branches from one doubled [uncond; cond] batch; only the conditional branch when w = 1."""
    if guidance == 1.0:
        return GuidedEps(denoiser(x, t, cond), None, guidance)
    eps_u, eps_c = denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null_cond, cond])).chunk(2)
    return GuidedEps(eps_c, eps_u, guidance)


@torch.no_grad()
def rollout(denoiser: GuidedDenoiser, schedule: DDIMSchedule, x_T: Tensor, cond: Tensor, eta: float,
            generator: torch.Generator | None, reference_denoiser: GuidedDenoiser | None = None, first_step: int = 0,
            batch_rows: tuple[slice, int] | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Sample DDIM transitions first_step..T-1 from x_T (the state at t_{first_step}) with guided denoisers.

    Returns (states (B, T - first_step, ...): the input x^(j) of every transition, the final sample x^(T),
    path_kl (B,) or None).
    path_kl is the true Gaussian KL of the whole chain to the reference chain along these states, in nats:
    sum_j sum_d (mu - mu_ref)^2 / (2 sigma_j^2).
    batch_rows = (rows, total): x_T and cond are rows `rows` of a batch of `total` whose noise is drawn whole each
    step and sliced, so a data-parallel shard gets exactly the noise one process sampling the batch gives its rows.
    """
    batch = x_T.shape[0]
    states = torch.empty((batch, schedule.num_steps - first_step) + tuple(x_T.shape[1:]), dtype=x_T.dtype,
                         device=x_T.device)
    path_kl = torch.zeros(batch, dtype=torch.float32, device=x_T.device) if reference_denoiser is not None else None
    x = x_T
    for j in range(first_step, schedule.num_steps):
        states[:, j - first_step] = x
        t = schedule.timesteps[j].expand(batch)
        eps = denoiser(x, t, cond)
        ref = reference_denoiser(x, t, cond) if reference_denoiser is not None else GuidedEps(None, None, 1.0)
        if batch_rows is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        else:
            rows, total = batch_rows
            noise = torch.randn((total, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)[rows]
        x, kl = ops.rollout_step(x, eps.cond, eps.uncond, eps.guidance, schedule.alpha_t[j], schedule.alpha_prev[j],
                                 eta, noise, ref.cond, ref.uncond)
        if path_kl is not None:
            path_kl += kl.float()
    return states, x, path_kl
