"""The baselines of docs/method.md §8, as published (with the fixes of §9), on the same engine as SQDF.

Each is an on-policy chain method: every micro-batch it runs the guided DDIM chain of the policy
(`sqdf_fast.rollout.ddim_chain`) from fresh x_T with gradient through some of its transitions and maximises the
reward of the result. They differ only in which transitions carry gradient and in what is rewarded. Transition j
maps x^(j) at t_j to x^(j+1) (docs/method.md §1); x^(T) = x_0 is the sample, T = sample_steps.

    draft      DRaFT-K: gradient through the last K transitions (K = draft_k)
    draft-lv   DRaFT-LV: DRaFT-1 plus n re-noisings of x_0 denoised again by the last transition (n = lv_samples)
    refl       ReFL: no-grad chain to a random transition K, K with gradient, the policy's one-step x0 at t_{K+1}
    alignprop  AlignProp: gradient through the last K ~ U{min..max} transitions, policy forwards checkpointed
    draft-kl   DRaFT+KL: DRaFT-K plus alpha times the KL of every transition to the reference

A chain method's `chain_loss(cond, x_T, generator) -> (loss, reward_q, kl_term, samples)` gives the loss, the
reward and KL term it is computed on, and the chain's final samples (images, reward) for logging, as SQDF's
rollouts do.
"""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from sqdf_fast import ops
from sqdf_fast.methods.base import FRESH_KEYS, Method
from sqdf_fast.rollout import ChainEnd, ddim_chain, generator_noise, rollout


def refl_range(cfg) -> tuple[int, int]:
    """ReFL's stop transitions [lo, hi] as indices 0..T-1 (negative options count from the end, clipped at 0)."""
    return tuple(v if v >= 0 else max(cfg.sample_steps + v, 0) for v in (cfg.refl_lo, cfg.refl_hi))


def alignprop_range(cfg) -> tuple[int, int]:
    """AlignProp's [fewest, most] transitions with gradient (alignprop_max_k 0: all T)."""
    return cfg.alignprop_min_k, cfg.alignprop_max_k or cfg.sample_steps


def host_randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer uniform in [low, high] for a choice the Python loop needs (how far gradient reaches), read from a
    hash of the generator's state. That state lives on the host for CPU and CUDA generators alike, so no device value
    is read (no host sync), and a resumed run, whose generator the checkpoint restores, draws the same. The chain's
    own noise draws move the state on, so successive calls differ."""
    digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest()
    return low + int.from_bytes(digest, "little") % (high - low + 1)


class ChainMethod(Method):
    """A baseline: trains on its own on-policy chains from fresh x_T, one set per micro-batch; no buffer."""
    estimator_name = "none (the sample itself)"

    def prepare(self, step: int, generator: torch.Generator) -> None:
        """Nothing: every micro-batch samples its own chains."""

    def micro_loss(self, micro: int, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        cond, x_T = self.new_chain_start(self.micro_size, generator)
        loss, reward_q, kl_term, (images, reward) = self.chain_loss(cond, x_T, generator)
        if micro == 0:
            self._parts = []
        self._parts.append({"reward": reward.detach(), "cond": cond, "images": images.detach()})
        if micro == self.cfg.grad_accum - 1:   # the step's final samples, all micro-batches together
            self.fresh = {k: torch.cat([part[k] for part in self._parts]) for k in FRESH_KEYS}
        return loss, {"reward_q": reward_q.detach().mean(),
                      "kl_term": loss.new_zeros(()) if kl_term is None else kl_term.detach().mean()}

    def chain(self, x: Tensor, cond: Tensor, generator: torch.Generator, grad_from: int, start: int = 0,
              stop: int | None = None, kl: bool = False, checkpointed: bool = False) -> ChainEnd:
        """The policy's chain from x = x^(start) with the trainer's noise; kl: with every transition's KL term to the
        reference (`ddim_chain`)."""
        return ddim_chain(self.policy_eps, self.schedule, x, cond, self.cfg.eta, generator_noise(generator),
                          start=start, stop=stop, grad_from=grad_from, reference=self.reference_eps if kl else None,
                          checkpointed=checkpointed)

    def chain_loss(self, cond: Tensor, x_T: Tensor, generator: torch.Generator
                   ) -> tuple[Tensor, Tensor, Tensor | None, tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def _sample_loss(self, x0: Tensor, cond: Tensor):
        """loss = -mean r(x_0) on the chain's sample itself."""
        images = self.task.decode(x0)
        reward = self.task.reward(images, cond)
        return -reward.mean(), reward, None, (images, reward)


# the baselines --------------------------------------------------------------------------------------------------------
class DRaFT(ChainMethod):
    """DRaFT-K (K = draft_k, default 1): the policy's chain x_T -> x_0 with gradient through its last K transitions.
        loss = -mean r(x_0),   gradient through transitions T-K .. T-1 only
    """

    def chain_loss(self, cond, x_T, generator):
        x0 = self.chain(x_T, cond, generator, grad_from=self.schedule.num_steps - self.cfg.draft_k).x
        return self._sample_loss(x0, cond)


class DRaFTLV(ChainMethod):
    """DRaFT-LV (n = lv_samples, default 2): the DRaFT-1 sample x_0, plus n samples of the last transition re-run
    (with gradient, fresh noise) on fresh re-noisings of x_0 to the last transition's input level:
        x'_i = sqrt(a) sg(x_0) + sqrt(1 - a) e_i,  a = abar(t_{T-1}),   x_0^(i) = policy step T-1 from x'_i
        loss = -mean over x_0, x_0^(1..n) of r
    (the authors reuse the last step's stale epsilon instead of re-running the model: docs/method.md §9.8).
    """

    def chain_loss(self, cond, x_T, generator):
        last, n = self.schedule.num_steps - 1, self.cfg.lv_samples
        x0 = self.chain(x_T, cond, generator, grad_from=last).x
        a = self.schedule.alpha_t[last]
        noise = torch.randn((n, *x0.shape), generator=generator, device=x0.device, dtype=x0.dtype)
        renoised = (a.sqrt() * x0.detach() + (1 - a).sqrt() * noise).flatten(0, 1)   # copy i of sample b at i*B + b
        conds = cond.repeat(n, *[1] * (cond.dim() - 1))
        extra = self.chain(renoised, conds, generator, grad_from=last, start=last).x
        images = self.task.decode(torch.cat([x0, extra]))
        reward = self.task.reward(images, torch.cat([cond, conds]))
        batch = x0.shape[0]
        return -reward.mean(), reward, None, (images[:batch], reward[:batch])


class ReFL(ChainMethod):
    """ReFL: K ~ U{refl_lo..refl_hi} per micro-batch (default the last 6 transitions); the chain to x^(K) without
    gradient, transition K with gradient, then the policy's one-step Tweedie estimate at the timestep x^(K+1) is at:
        x0_hat = (x^(K+1) - sqrt(1 - abar(t_{K+1})) eps_theta(x^(K+1), t_{K+1})) / sqrt(abar(t_{K+1})),
        x0_hat = x^(T) when K = T - 1;     loss = -mean r(x0_hat)
    (the authors use t_K here, one step off: docs/method.md §9.8). That epsilon is also the next transition's, so the
    chain goes on from it to a full sample (no gradient) for logging.
    """
    estimator_name = "policy tweedie at t_{K+1}"

    def chain_loss(self, cond, x_T, generator):
        T = self.schedule.num_steps
        k = host_randint(generator, *refl_range(self.cfg))
        if k == T - 1:
            x0_hat = final = self.chain(x_T, cond, generator, grad_from=k).x
        else:
            end = self.chain(x_T, cond, generator, grad_from=k, stop=k + 2)
            x0_hat = ops.tweedie_x0(end.x_last, end.eps_last.combined(), self.schedule.alpha_t[k + 1])
            _, final, _ = rollout(self.policy_eps, self.schedule, end.x.detach(), cond, self.cfg.eta, generator,
                                  first_step=k + 2)
        trained = self.task.reward(self.task.decode(x0_hat), cond)
        with torch.no_grad():
            images = self.task.decode(final)
            reward = self.task.reward(images, cond)
        return -trained.mean(), trained, None, (images, reward)


class AlignProp(ChainMethod):
    """AlignProp, randomised truncated backpropagation: K ~ U{alignprop_min_k..alignprop_max_k} (default 1..T) per
    micro-batch, gradient through the last K transitions, every policy forward checkpointed.
        loss = -mean r(x_0)
    """

    def chain_loss(self, cond, x_T, generator):
        k = host_randint(generator, *alignprop_range(self.cfg))
        x0 = self.chain(x_T, cond, generator, grad_from=self.schedule.num_steps - k, checkpointed=True).x
        return self._sample_loss(x0, cond)


class DRaFTKL(ChainMethod):
    """DRaFT+KL: DRaFT-K's reward gradient plus alpha times the KL of every transition to the reference:
        loss = mean(-r(x_0) + alpha sum_j KL_j),   KL_j = mean_d (mu_theta - mu_ref)^2 / sigma_j^2 (SQDF's scale)
    One policy forward per transition, with gradient, gives both the step and its KL (the authors run it twice:
    docs/method.md §9.8); the reference runs without gradient, adapter off. KL_j is differentiable in transition j's
    epsilon; within the last K transitions it also reaches earlier states through that epsilon's input.
    """

    def __init__(self, task, schedule, cfg, world=1):
        super().__init__(task, schedule, cfg, world)
        self.require_gaussian_policy()

    def chain_loss(self, cond, x_T, generator):
        end = self.chain(x_T, cond, generator, grad_from=self.schedule.num_steps - self.cfg.draft_k, kl=True)
        images = self.task.decode(end.x)
        reward = self.task.reward(images, cond)
        kl_term = end.kl.to(reward.dtype)
        # sqdf_loss with k = 0, gamma = 1: mean(-r + alpha kl_term)
        loss = ops.sqdf_loss(reward, kl_term, torch.zeros_like(reward), 1.0, self.cfg.alpha)
        return loss, reward, kl_term, (images, reward)

