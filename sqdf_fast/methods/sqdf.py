"""SQDF (docs/method.md §2-§6): the soft-Q policy gradient on stored states x_j of the policy's own trajectories.

Every optimizer step (`prepare`) fresh trajectories are sampled, when due, into the replay buffer; every micro-batch
(`micro_loss`) draws (trajectory, step j) pairs and, at state x_j (transition j of a stored trajectory):

  eps_theta, eps_ref  = guided policy / reference epsilon (same weights, adapter on / off, reference without grad)
  a, kl_term          = policy step: a = mu_theta + sigma_j z (fresh z),
                        kl_term = mean_d (mu_theta - mu_ref)^2 / sigma_j^2
  x0_hat              = consistency model or reference Tweedie at (a, t_{j+1}); x0_hat = a after the last transition
  r                   = reward(decode(x0_hat), c)        gradient flows into a, never into the frozen estimator
  loss                = mean(w * (-gamma^k r + alpha kl_term)),  k = T - 1 - j

With q_samples n > 1 (or q_steps m > 0) r is replaced by the soft-Q estimate of docs/method.md §3.6:
  x0^(i)              = m stochastic bridge steps from (a, t_{j+1}) toward 0, then the one-step estimate, i = 1..n
  Q                   = alpha_true log (1/n) sum_i exp(r(x0^(i)) / alpha_true),   alpha_true = 2 alpha / d
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from sqdf_fast import ops
from sqdf_fast.buffer import ReplayBuffer
from sqdf_fast.graphs import GraphRollout
from sqdf_fast.methods.base import Method
from sqdf_fast.ops.reference import per_sample
from sqdf_fast.schedule import step_discounts

STEP_SAMPLERS = ("uniform", "discounted")
Q_SAMPLERS = ("bridge", "renoise")


class SQDF(Method):
    """The SQDF loss of the module docstring, on states from the replay buffer (or, without one, from this step's
    fresh trajectories)."""

    def __init__(self, task, schedule, cfg, world=1):
        super().__init__(task, schedule, cfg, world)
        use_consistency = cfg.q_estimator == "consistency" or (cfg.q_estimator == "auto"
                                                               and task.consistency is not None)
        if use_consistency and task.consistency is None:
            raise ValueError(f"q_estimator='consistency': task {task.name!r} has no consistency model")
        self.estimator = self._consistency_x0 if use_consistency else self._tweedie_x0
        self.estimator_name = "consistency" if use_consistency else "tweedie"
        self.require_gaussian_policy()
        if cfg.buffer:
            device = schedule.timesteps.device
            cond_example = task.sample_conditions(1, torch.Generator(device).manual_seed(0))
            self.buffer = ReplayBuffer(self.buffer_capacity, cfg.sample_steps, task.sample_shape,
                                       tuple(cond_example.shape[1:]), cond_example.dtype, device,
                                       getattr(torch, cfg.buffer_dtype))
        # the training rollouts: graph-captured when cfg.cuda_graphs is on and the samples are on CUDA, else eager
        self.sampler = GraphRollout(self.policy_eps, schedule, cfg.eta, modules=[task.unet], enabled=cfg.cuda_graphs)

    # the trainer's interface ------------------------------------------------------------------------------------
    def prepare(self, step: int, generator: torch.Generator) -> None:
        """Collect fresh trajectories every replay_ratio steps into the buffer (every step without one)."""
        if self.buffer is not None and step % self.cfg.replay_ratio:
            return
        n = (self.rollout_size if self.buffer is not None
             else self.micro_size * self.cfg.grad_accum // self.cfg.steps_per_trajectory)
        self.fresh = self.collect(n, generator)
        if self.buffer is not None:
            self.buffer.add(self.fresh["states"], self.fresh["cond"], self.fresh["reward"])

    def micro_loss(self, micro: int, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x, j, cond, weight = self.draw(micro, generator)
        return self.loss(x, j, cond, weight, generator)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "buffer": self.buffer.state_dict() if self.buffer is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.buffer is not None:
            self.buffer.load_state_dict(state["buffer"])

    # data -------------------------------------------------------------------------------------------------------
    def collect(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """n fresh trajectories of the current policy (no grad) with their final rewards."""
        cond, x_T = self.new_chain_start(n, generator)
        states, x0, _ = self.sampler(x_T, cond, generator)
        with torch.no_grad():
            images = self.task.decode(x0)
            reward = self.task.reward(images, cond)
        return {"states": states, "cond": cond, "reward": reward, "images": images}

    def draw(self, micro: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """One micro-batch of (x_j, j, cond, loss weight): trajectories from the buffer, or micro-batch `micro`'s own
        rows of this step's fresh trajectories, and for each its trained transitions j. Only the trained states are
        gathered, not whole trajectories."""
        cfg, size = self.cfg, self.micro_size
        if self.buffer is not None and cfg.buffer_sampler == "reward-gamma":   # (trajectory, j) drawn jointly
            slots, j, weight = self.buffer.sample(size, "reward-gamma", generator, cfg.gamma,
                                                  cfg.buffer_importance_weights)
            return self.buffer.states[slots, j].float(), j, self.buffer.cond[slots], weight
        n_traj = size // cfg.steps_per_trajectory
        if self.buffer is not None:
            slots, _, _ = self.buffer.sample(n_traj, cfg.buffer_sampler, generator)
            states, cond = self.buffer.states, self.buffer.cond
        else:
            slots = torch.arange(micro * n_traj, (micro + 1) * n_traj, device=generator.device)
            states, cond = self.fresh["states"], self.fresh["cond"]
        rows = slots.repeat_interleave(cfg.steps_per_trajectory)
        j, weight = sample_steps(size, self.schedule.num_steps, cfg.step_sampler, cfg.gamma, generator,
                                 generator.device)
        return states[rows, j].float(), j, cond[rows], weight

    # one-step x0 estimators: (x, t, abar(t), cond) -> x0 ----------------------------------------------------
    def _consistency_x0(self, x: Tensor, t: Tensor, abar: Tensor, cond: Tensor) -> Tensor:
        return self.task.consistency(x, t, cond)

    def _tweedie_x0(self, x: Tensor, t: Tensor, abar: Tensor, cond: Tensor) -> Tensor:
        eps = self.reference_eps(x, t, cond, self.cfg.estimator_guidance)
        return ops.tweedie_x0(x, eps.combined(), abar)

    def _posterior_samples(self, a: Tensor, t: Tensor, cond: Tensor, noise: Tensor) -> Tensor:
        return posterior_bridge(lambda x, s: self.estimator(x, s, self.schedule.alphas_cumprod[s], cond), a, t,
                                self.schedule.alphas_cumprod, noise, self.cfg.q_sampler == "renoise")

    def x0_estimate(self, a: Tensor, j: Tensor, cond: Tensor, noise: Tensor | None = None) -> Tensor:
        """The clean estimate the reward sees: the one-step estimate at (a, t_{j+1}), or with bridge `noise`
        (m, B, ...) a sample of the bridge of docs/method.md §3.6; a itself after the last transition."""
        checkpointed = self.cfg.checkpoint_estimator and torch.is_grad_enabled()
        if noise is None:
            args = (self.estimator, a, self.schedule.next_timesteps[j], self.schedule.alpha_prev[j], cond)
        else:   # the noise is an input, so the recomputation in the backward pass draws nothing
            args = (self._posterior_samples, a, self.schedule.next_timesteps[j], cond, noise)
        x0 = checkpoint(*args, use_reentrant=False) if checkpointed else args[0](*args[1:])
        # after the last transition the action is the sample itself; the estimate computed for those rows is
        # discarded by `where` rather than split out, which would need a host sync
        last = per_sample(j == self.schedule.num_steps - 1, a).bool()
        return torch.where(last, a, x0)

    def soft_q(self, a: Tensor, j: Tensor, cond: Tensor, generator: torch.Generator) -> Tensor:
        """(B,) the reward of the one-step estimate (q_samples 1, q_steps 0: the paper's Q), else the log-mean-exp
        of the rewards of q_samples bridge samples, all n B rows in one batched call (docs/method.md §3.6)."""
        n, m = self.cfg.q_samples, self.cfg.q_steps
        if n == 1 and m == 0:
            return self.task.reward(self.task.decode(self.x0_estimate(a, j, cond)), cond)
        rows = a.repeat(n, *(1,) * (a.dim() - 1))   # sample-major: row i B + b is sample i of action b
        j_rows, cond_rows = j.repeat(n), cond.repeat(n, *(1,) * (cond.dim() - 1))
        noise = torch.randn((m, *rows.shape), generator=generator, device=a.device, dtype=a.dtype)
        x0 = self.x0_estimate(rows, j_rows, cond_rows, noise)
        reward = self.task.reward(self.task.decode(x0), cond_rows).reshape(n, a.shape[0])
        return log_mean_exp(reward, 2 * self.cfg.alpha / math.prod(self.task.sample_shape))

    # the loss ---------------------------------------------------------------------------------------------------
    def loss(self, x: Tensor, j: Tensor, cond: Tensor, weight: Tensor | None,
             generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        t = self.schedule.timesteps[j]
        eps = self.policy_eps(x, t, cond)
        with torch.no_grad():
            ref = self.reference_eps(x, t, cond)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        action, kl_term = ops.guided_policy_step(x, eps.cond, eps.uncond, eps.guidance, self.schedule.alpha_t[j],
                                                 self.schedule.alpha_prev[j], self.cfg.eta, noise, ref.cond,
                                                 ref.uncond)
        reward = self.soft_q(action, j, cond, generator)
        if self.cfg.reward_mask:
            mask = (reward > 0).to(reward.dtype)
            weight = mask if weight is None else weight * mask
        k = self.schedule.num_steps - 1 - j
        loss = ops.sqdf_loss(reward, kl_term, k, self.cfg.gamma, self.cfg.alpha, weight)
        return loss, {"reward_q": reward.detach().mean(), "kl_term": kl_term.detach().mean()}


def sample_steps(n: int, num_steps: int, sampler: str, gamma: float, generator: torch.Generator,
                 device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Trained transitions j (n,) and their loss weights: uniform, or discounted q(j) ~ gamma^(T-1-j) with
    weights (1/T)/q(j) so that the expected loss is that of uniform sampling."""
    if sampler not in STEP_SAMPLERS:
        raise ValueError(f"step_sampler={sampler!r}: must be one of {', '.join(STEP_SAMPLERS)}")
    if sampler == "uniform":
        return torch.randint(0, num_steps, (n,), generator=generator, device=device), None
    q = step_discounts(num_steps, gamma, device)
    q = q / q.sum()
    j = torch.multinomial(q, n, replacement=True, generator=generator)
    return j, 1.0 / (num_steps * q[j])


def posterior_bridge(x0_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, alphas_cumprod: Tensor,
                     noise: Tensor, renoise: bool = False) -> Tensor:
    """A sample of (an approximation of) p(x0 | x_t = x): m = len(noise) stochastic steps t = s_0 > s_1 > ... > s_m,
    s_k = floor(s_{k-1} (m + 1 - k) / (m + 1)) (each step keeps the fraction (m + 1 - k) / (m + 1) of the timestep
    left, so the steps get finer toward 0, where the modes separate: m = 2 gives t, 2t/3, 2t/9), then the one-step
    estimate x0_fn(x_{s_m}, s_m). Each step is the ancestral DDIM step (eta = 1) with x0_hat = x0_fn(x_s, s) and
    eps_hat = (x_s - sqrt(a) x0_hat) / sqrt(1 - a), a = abar(s), a' = abar(s'):

        x_s' = sqrt(a') x0_hat + sqrt(1 - a' - v) eps_hat + sqrt(v) z,    v = (1 - a') / (1 - a) (1 - a / a')

    i.e. the bridge q(x_s' | x_s, x0 = x0_hat), which is the reference's own transition when x0_fn is its Tweedie
    estimate; with `renoise` instead x_s' = sqrt(a') x0_hat + sqrt(1 - a') z (multistep consistency sampling, which
    forgets x_s but for x0_hat). Differentiable in x; t (B,) long; noise (m, B, ...)."""
    m = noise.shape[0]
    for k in range(1, m + 1):
        s = t * (m + 1 - k) // (m + 1)
        abar, abar_next = per_sample(alphas_cumprod[t], x), per_sample(alphas_cumprod[s], x)
        x0 = x0_fn(x, t)
        if renoise:
            x = abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * noise[k - 1]
        else:
            eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
            var = (1 - abar_next) / (1 - abar) * (1 - abar / abar_next)
            x = abar_next.sqrt() * x0 + (1 - abar_next - var).clamp_min(0).sqrt() * eps + var.sqrt() * noise[k - 1]
        t = s
    return x0_fn(x, t)


def log_mean_exp(reward: Tensor, alpha: float) -> Tensor:
    """(n, B) rewards of n samples per row -> (B,) alpha log (1/n) sum_i exp(r_i / alpha), via logsumexp; the max at
    alpha = 0 (its limit). Its expectation is below alpha log E[exp(r / alpha)] (Jensen), by about
    alpha (E[w^2] / E[w]^2 - 1) / (2n) for w = exp(r / alpha) (docs/method.md §3.6)."""
    if alpha == 0:
        return reward.amax(0)
    return alpha * (torch.logsumexp(reward / alpha, 0) - math.log(reward.shape[0]))
