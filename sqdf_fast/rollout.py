"""Classifier-free-guided denoiser calls and THE guided DDIM chain, written once.

`ddim_chain` runs transitions start..stop-1 of the policy. Its options cover every user: the no-grad sampler
`rollout` (states recorded, path KL in nats), the chain baselines (gradient through the last transitions, the KL
term of every transition, checkpointed policy forwards) and the CUDA-graph sampler (static buffers, pre-drawn noise).
Transition j maps x^(j) at t_j to x^(j+1) at t_{j+1} (docs/method.md §1); x^(T) = x_0 is the sample.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

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


NO_REFERENCE = GuidedEps(None, None, 1.0)

# (x, t, cond) -> epsilon, with t a (B,) long tensor of timesteps
Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]
GuidedDenoiser = Callable[[Tensor, Tensor, Tensor], GuidedEps]
# (j, x) -> the noise of transition j for state x; called once per transition, in transition order
NoiseSource = Callable[[int, Tensor], Tensor]


def guided_eps(denoiser: Denoiser, x: Tensor, t: Tensor, cond: Tensor, null_cond: Tensor,
               guidance: float) -> GuidedEps:
    """Both branches from one doubled [uncond; cond] batch; only the conditional branch when w = 1."""
    if guidance == 1.0:
        return GuidedEps(denoiser(x, t, cond), None, guidance)
    eps_u, eps_c = denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null_cond, cond])).chunk(2)
    return GuidedEps(eps_c, eps_u, guidance)


def generator_noise(generator: torch.Generator | None, batch_rows: tuple[slice, int] | None = None) -> NoiseSource:
    """Noise drawn from `generator`, one `randn(x.shape)` per transition. batch_rows = (rows, total): x is rows `rows`
    of a batch of `total` whose noise is drawn whole and sliced, so a data-parallel shard gets exactly the noise one
    process sampling the whole batch gives its rows."""
    if batch_rows is None:
        return lambda j, x: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    rows, total = batch_rows
    return lambda j, x: torch.randn((total, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)[rows]


class ChainEnd(NamedTuple):
    x: Tensor              # the state after the last transition run: x^(stop)
    x_last: Tensor         # the input of that transition, x^(stop-1) ...
    eps_last: GuidedEps    # ... and its guided policy epsilon
    kl: Tensor | None      # (B,) float32 sum over the transitions run of their KL to the reference, with a reference


def ddim_chain(policy: GuidedDenoiser, schedule: DDIMSchedule, x: Tensor, cond: Tensor, eta: float,
               noise: NoiseSource, *, start: int = 0, stop: int | None = None, grad_from: int = 0,
               reference: GuidedDenoiser | None = None, kl_in_nats: bool = False, checkpointed: bool = False,
               states: Tensor | None = None) -> ChainEnd:
    """Guided DDIM transitions start..stop-1 (default: to the end) of `policy` from x = x^(start).

    Gradient (when grad is enabled by the caller): transitions j >= grad_from carry it; the state entering
    grad_from is detached and the graph is kept from there on. With a `reference` every transition runs its policy
    forward with grad and adds its KL to the reference (run without grad), differentiable in its own epsilon, while
    the state stays detached between the transitions before grad_from, so the reward's gradient stops there.
    kl is the per-dimension training term kl_term_j = mean_d (mu - mu_ref)^2 / sigma_j^2 of each transition, or with
    kl_in_nats the true Gaussian KL sum_d (mu - mu_ref)^2 / (2 sigma_j^2) = kl_term_j d / 2 (the path KL).
    checkpointed: every policy forward with grad is recomputed in the backward pass instead of kept.
    states: (B, stop - start, ...) written with each transition's input x^(j).
    """
    stop = schedule.num_steps if stop is None else stop
    nats_per_term = x[0].numel() / 2 if kl_in_nats else 1.0
    total_kl = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device) if reference is not None else None
    x_last, eps_last = x, None
    for j in range(start, stop):
        if j <= grad_from:
            x = x.detach()
        if states is not None:
            states[:, j - start] = x
        t = schedule.timesteps[j].expand(x.shape[0])
        step_noise = noise(j, x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and (reference is not None or j >= grad_from)):
            if checkpointed and torch.is_grad_enabled():
                eps = checkpoint(policy, x, t, cond, use_reentrant=False)
            else:
                eps = policy(x, t, cond)
            with torch.no_grad():
                ref = reference(x, t, cond) if reference is not None else NO_REFERENCE
            x_next, kl_j = ops.guided_policy_step(x, eps.cond, eps.uncond, eps.guidance, schedule.alpha_t[j],
                                                  schedule.alpha_prev[j], eta, step_noise, ref.cond, ref.uncond)
        if total_kl is not None:
            total_kl += (kl_j * nats_per_term).float()
        x_last, eps_last, x = x, eps, x_next
    return ChainEnd(x, x_last, eps_last, total_kl)


@torch.no_grad()
def rollout(denoiser: GuidedDenoiser, schedule: DDIMSchedule, x_T: Tensor, cond: Tensor, eta: float,
            generator: torch.Generator | None, reference_denoiser: GuidedDenoiser | None = None, first_step: int = 0,
            batch_rows: tuple[slice, int] | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Sample DDIM transitions first_step..T-1 from x_T (the state at t_{first_step}) without gradient.

    Returns (states (B, T - first_step, ...): the input x^(j) of every transition, the final sample x^(T),
    path_kl (B,) in nats against the reference chain along these states, or None without a reference).
    batch_rows: see `generator_noise`.
    """
    states = torch.empty((x_T.shape[0], schedule.num_steps - first_step) + tuple(x_T.shape[1:]), dtype=x_T.dtype,
                         device=x_T.device)
    end = ddim_chain(denoiser, schedule, x_T, cond, eta, generator_noise(generator, batch_rows), start=first_step,
                     reference=reference_denoiser, kl_in_nats=True, states=states)
    return states, end.x, end.kl
