"""The one interface every fine-tuning method gives the trainer, and what all methods share.

The trainer calls, every optimizer step:

    method.prepare(step, generator)                 SQDF collects fresh trajectories into its buffer when due;
                                                    chain methods start a new step's samples
    for micro in range(grad_accum):
        loss, stats = method.micro_loss(micro, generator)
        (loss / grad_accum).backward()
    method.fresh                                    the newest samples (reward, cond, images) for logging

and `state_dict()` / `load_state_dict()` at checkpoint and resume. stats are scalar device tensors: `reward_q`
(the mean reward the loss is computed on) and `kl_term` (the mean per-dimension KL term of the loss,
docs/method.md §4.2). Nothing here reads a device value on the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sqdf_fast.adapters import adapters_disabled, only_adapter
from sqdf_fast.rollout import GuidedEps, guided_eps
from sqdf_fast.schedule import DDIMSchedule
from sqdf_fast.tasks import Task

FRESH_KEYS = ("reward", "cond", "images")


class Method:
    """A method on one task: the DDIM schedule tables, the config, the guided policy (base + adapter) and reference
    (adapter off) denoisers. With `world` data-parallel processes, this process's share of the global counts:
    `micro_size` samples per micro-batch (batch_size / world / grad_accum), `rollout_size` trajectories per rollout
    and `buffer_capacity` (config.validate checks they divide)."""
    estimator_name = "none"   # the one-step x0 estimate the reward sees, for the start-up line
    buffer = None             # the replay buffer of a method that keeps one
    # None: the reference is the base model (adapters off); an adapter's name: the base with that frozen adapter
    # alone (the black-box loop's KL to the previous round's model, sqdf_fast.bbo)
    reference_adapter: str | None = None

    def __init__(self, task: Task, schedule: DDIMSchedule, cfg, world: int = 1):
        self.task, self.schedule, self.cfg = task, schedule, cfg
        self.micro_size = cfg.batch_size // world // cfg.grad_accum
        self.rollout_size, self.buffer_capacity = cfg.rollout_batch // world, cfg.buffer_size // world
        self.fresh: dict[str, Tensor] | None = None

    # the trainer's interface ------------------------------------------------------------------------------------
    def prepare(self, step: int, generator: torch.Generator) -> None:
        raise NotImplementedError

    def micro_loss(self, micro: int, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        # None before the first step (a checkpoint of step 0: the black-box loop's, after measuring the base)
        return {"fresh": None if self.fresh is None else {k: self.fresh[k] for k in FRESH_KEYS}}

    def load_state_dict(self, state: dict) -> None:
        self.fresh = state["fresh"]

    # shared pieces ------------------------------------------------------------------------------------------
    def require_gaussian_policy(self) -> None:
        """The KL divides by sigma_j^2: every transition must have sigma_j > 0."""
        if not bool((self.schedule.sigma(self.cfg.eta) > 0).all()):
            raise ValueError("sample_steps: some transition has sigma_j = 0 (a scheduler with set_alpha_to_one=True?):"
                             " the policy must be Gaussian at every step for the KL")

    def policy_eps(self, x: Tensor, t: Tensor, cond: Tensor, guidance: float | None = None) -> GuidedEps:
        w = self.cfg.guidance if guidance is None else guidance
        return guided_eps(self.task.eps, x, t, cond, self.task.null_condition(cond), w)

    def reference_eps(self, x: Tensor, t: Tensor, cond: Tensor, guidance: float | None = None) -> GuidedEps:
        """The base model: the policy's own weights with the adapter off (or `reference_adapter` alone);
        differentiable in x when grad is on."""
        unet = self.task.unet
        with adapters_disabled(unet) if self.reference_adapter is None else only_adapter(unet, self.reference_adapter):
            return self.policy_eps(x, t, cond, guidance)

    def new_chain_start(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(cond, x_T) of n fresh chains: the conditions, then the noise, from `generator`."""
        cond = self.task.sample_conditions(n, generator)
        x_T = torch.randn((n, *self.task.sample_shape), generator=generator, device=generator.device)
        return cond, x_T
