"""Fine-tuning methods on one engine: the shared `Method` base, the SQDF training micro-step (sqdf-method.md §2-§3,
with §11's fixes) and the registry `METHODS` / `make_method` (the baselines are in `sqdf_fast/baselines.py`).

SQDF at state x_j (transition j of a stored trajectory):
  eps_theta, eps_ref  = guided policy / reference epsilon (same weights, adapter on / off, reference without grad)
  a, kl               = policy_step: a = mu_theta + sigma_j z (fresh z), kl = mean_d (mu_theta - mu_ref)^2 / sigma_j^2
  x0_hat              = consistency model or reference Tweedie at (a, t_{j+1}); x0_hat = a after the last transition
  r                   = reward(decode(x0_hat), c)        gradient flows into a, never into the frozen estimator
  loss                = mean(w * (-gamma^k r + alpha kl)),  k = T - 1 - j
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from sqdf_fast import ops
from sqdf_fast.adapters import adapters_disabled
from sqdf_fast.ops.reference import per_sample
from sqdf_fast.rollout import GuidedEps, guided_eps
from sqdf_fast.schedule import DDIMSchedule, step_discounts
from sqdf_fast.tasks import Task


class Method:
    """What every method shares: the task, the DDIM schedule tables, the config, and the guided policy (base +
    adapter) and reference (adapter off) denoisers.

    `trains_on` tells the trainer what a method learns from:
    - "states": x_j drawn from collected trajectories or the replay buffer, `loss(x, j, cond, weight, generator)
      -> (loss, stats)` (SQDF);
    - "chains": its own on-policy chains from fresh x_T, `chain_loss(cond, x_T, generator) -> (loss, stats, fresh)`
      (the baselines); no buffer is kept for them.
    stats are scalar device tensors `reward_q` (the reward the loss is computed on) and `kl_term`.
    """
    trains_on = "states"
    estimator_name = "none"   # the one-step x0 estimate the reward sees, for the start-up line

    def __init__(self, task: Task, schedule: DDIMSchedule, cfg):
        self.task, self.schedule, self.cfg = task, schedule, cfg

    def require_gaussian_policy(self) -> None:
        """The KL divides by sigma_j^2: every transition must have sigma_j > 0."""
        if not bool((self.schedule.sigma(self.cfg.eta) > 0).all()):
            raise ValueError("sample_steps: some transition has sigma_j = 0 (a scheduler with set_alpha_to_one=True?):"
                             " the policy must be Gaussian at every step for the KL")

    # denoisers -----------------------------------------------------------------------------------------------
    def _eps(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.task.eps(self.task.unet, x, t, cond)

    def policy_eps(self, x: Tensor, t: Tensor, cond: Tensor, guidance: float | None = None) -> GuidedEps:
        w = self.cfg.guidance if guidance is None else guidance
        return guided_eps(self._eps, x, t, cond, self.task.null_condition(cond), w)

    def reference_eps(self, x: Tensor, t: Tensor, cond: Tensor, guidance: float | None = None) -> GuidedEps:
        """The base model: the policy's own weights with the adapter off (differentiable in x when grad is on)."""
        with adapters_disabled(self.task.unet):
            return self.policy_eps(x, t, cond, guidance)


class SQDF(Method):
    """The SQDF loss of the module docstring, on stored states x_j."""

    def __init__(self, task: Task, schedule: DDIMSchedule, cfg):
        super().__init__(task, schedule, cfg)
        use_consistency = cfg.q_estimator == "consistency" or (cfg.q_estimator == "auto"
                                                               and task.consistency is not None)
        if use_consistency and task.consistency is None:
            raise ValueError(f"q_estimator='consistency': task {task.name!r} has no consistency model")
        self.estimator = self._consistency_x0 if use_consistency else self._tweedie_x0
        self.estimator_name = "consistency" if use_consistency else "tweedie"
        self.require_gaussian_policy()

    # one-step x0 estimators of the next state --------------------------------------------------------------
    def _consistency_x0(self, a: Tensor, j: Tensor, cond: Tensor) -> Tensor:
        return self.task.consistency(a, self.schedule.next_timesteps[j], cond)

    def _tweedie_x0(self, a: Tensor, j: Tensor, cond: Tensor) -> Tensor:
        eps = self.reference_eps(a, self.schedule.next_timesteps[j], cond, self.cfg.estimator_guidance)
        return ops.tweedie_x0(a, eps.combined(), self.schedule.alpha_prev[j])

    def x0_estimate(self, a: Tensor, j: Tensor, cond: Tensor) -> Tensor:
        if self.cfg.checkpoint_estimator and torch.is_grad_enabled():
            x0 = checkpoint(self.estimator, a, j, cond, use_reentrant=False)
        else:
            x0 = self.estimator(a, j, cond)
        # after the last transition the action is the sample itself; the estimate computed for those rows is
        # discarded by `where` rather than split out, which would need a host sync
        last = per_sample(j == self.schedule.num_steps - 1, a).bool()
        return torch.where(last, a, x0)

    # the loss ---------------------------------------------------------------------------------------------------
    def loss(self, x: Tensor, j: Tensor, cond: Tensor, weight: Tensor | None,
             generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        t = self.schedule.timesteps[j]
        eps = self.policy_eps(x, t, cond)
        with torch.no_grad():
            ref = self.reference_eps(x, t, cond)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        action, kl = ops.guided_policy_step(x, eps.cond, eps.uncond, eps.guidance, self.schedule.alpha_t[j],
                                            self.schedule.alpha_prev[j], self.cfg.eta, noise, ref.cond, ref.uncond)
        reward = self.task.reward(self.task.decode(self.x0_estimate(action, j, cond)), cond)
        if self.cfg.reward_mask:
            mask = (reward > 0).to(reward.dtype)
            weight = mask if weight is None else weight * mask
        k = self.schedule.num_steps - 1 - j
        loss = ops.sqdf_loss(reward, kl, k, self.cfg.gamma, self.cfg.alpha, weight)
        return loss, {"reward_q": reward.detach().mean(), "kl_term": kl.detach().mean()}


def sample_steps(n: int, num_steps: int, sampler: str, gamma: float, generator: torch.Generator,
                 device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Trained transitions j (n,) and their loss weights: uniform, or discounted q(j) ~ gamma^(T-1-j) with
    weights (1/T)/q(j) so that the expected loss is that of uniform sampling."""
    if sampler not in ("uniform", "discounted"):
        raise ValueError(f"step_sampler={sampler!r}: must be uniform or discounted")
    if sampler == "uniform":
        return torch.randint(0, num_steps, (n,), generator=generator, device=device), None
    q = step_discounts(num_steps, gamma, device)
    q = q / q.sum()
    j = torch.multinomial(q, n, replacement=True, generator=generator)
    return j, 1.0 / (num_steps * q[j])


# the registry: SQDF here; sqdf_fast.baselines adds the baselines when it is imported (it subclasses Method, so it
# cannot be imported at the top of this module), which make_method does
METHODS: dict[str, type[Method]] = {"sqdf": SQDF}


def make_method(task: Task, schedule: DDIMSchedule, cfg) -> Method:
    """The method `cfg.method` names (config.METHOD_CHOICES)."""
    import sqdf_fast.baselines  # noqa: F401 -- registers the baselines in METHODS
    if cfg.method not in METHODS:
        raise ValueError(f"method={cfg.method!r}: must be one of {', '.join(METHODS)}")
    return METHODS[cfg.method](task, schedule, cfg)
