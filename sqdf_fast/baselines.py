"""The baselines of sqdf-method.md §7, as published (with the fixes of §11), on the same engine as SQDF.

Each is an on-policy chain method: every micro-batch it runs the guided DDIM chain of the policy from fresh x_T with
gradient through some of its transitions and maximises the reward of the result. They differ only in which
transitions carry gradient and in what is rewarded. Transition j maps x^(j) at t_j to x^(j+1) (sqdf-method.md §1);
x^(T) = x_0 is the sample, T = sample_steps.

    draft      DRaFT-K: gradient through the last K transitions (K = draft_k)
    draft-lv   DRaFT-LV: DRaFT-1 plus n re-noisings of x_0 denoised again by the last transition (n = lv_samples)
    refl       ReFL: no-grad chain to a random transition K, K with gradient, the policy's one-step x0 at t_{K+1}
    alignprop  AlignProp: gradient through the last K ~ U{min..max} transitions, policy forwards checkpointed
    draft-kl   DRaFT+KL: DRaFT-K plus alpha times the KL of every transition to the reference

The trainer calls `chain_loss(cond, x_T, generator) -> (loss, stats, fresh)`: fresh holds the chain's final samples
(detached) for logging, as SQDF's rollouts do.
"""
from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from sqdf_fast import config, ops
from sqdf_fast.method import METHODS, Method
from sqdf_fast.rollout import GuidedEps, rollout

NO_REFERENCE = GuidedEps(None, None, 1.0)


# the shared chain ---------------------------------------------------------------------------------------------------
class ChainEnd(NamedTuple):
    x: Tensor              # the state after the last transition run: x^(stop)
    x_last: Tensor         # the input of that transition, x^(stop-1) ...
    eps_last: GuidedEps    # ... and its guided policy epsilon
    kl: Tensor | None      # (B,) sum over the transitions run of KL_code,j (SQDF's scale), with kl=True


def chain(method: Method, x: Tensor, cond: Tensor, generator: torch.Generator, grad_from: int, start: int = 0,
          stop: int | None = None, kl: bool = False, checkpointed: bool = False) -> ChainEnd:
    """Guided DDIM transitions start..stop-1 (default: to the end) of the policy from x = x^(start). Each transition
    draws its noise as `rollout` does, so the same generator state gives the same states.

    Transitions j >= grad_from carry gradient: the state entering grad_from is detached and the graph is kept from
    there on. Earlier transitions run without grad, except with kl=True: then every transition runs its one policy
    forward with grad and gives its KL to the reference (no grad, adapter off), differentiable in its own epsilon,
    while the state is still detached between the transitions before grad_from, so the reward's gradient stops there.
    checkpointed: every policy forward with grad is gradient-checkpointed (recomputed in the backward pass).
    """
    schedule = method.schedule
    stop = schedule.num_steps if stop is None else stop
    total_kl = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device) if kl else None
    for j in range(start, stop):
        if j <= grad_from:
            x = x.detach()
        t = schedule.timesteps[j].expand(x.shape[0])
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and (kl or j >= grad_from)):
            if checkpointed and torch.is_grad_enabled():
                eps = checkpoint(method.policy_eps, x, t, cond, use_reentrant=False)
            else:
                eps = method.policy_eps(x, t, cond)
            with torch.no_grad():
                ref = method.reference_eps(x, t, cond) if kl else NO_REFERENCE
            x_next, kl_j = ops.guided_policy_step(x, eps.cond, eps.uncond, eps.guidance, schedule.alpha_t[j],
                                                  schedule.alpha_prev[j], method.cfg.eta, noise, ref.cond, ref.uncond)
        if kl:
            total_kl = total_kl + kl_j.float()
        x_last, eps_last, x = x, eps, x_next
    return ChainEnd(x, x_last, eps_last, total_kl)


def host_randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer uniform in [low, high] for a choice the Python loop needs (how far gradient reaches), read from a
    hash of the generator's state. That state lives on the host for CPU and CUDA generators alike, so no device value
    is read (no host sync), and a resumed run, whose generator the checkpoint restores, draws the same. The chain's
    own noise draws move the state on, so successive calls differ."""
    digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest()
    return low + int.from_bytes(digest, "little") % (high - low + 1)


class ChainMethod(Method):
    """A baseline: trains on its own on-policy chains."""
    trains_on = "chains"
    estimator_name = "none (the sample itself)"

    def chain_loss(self, cond: Tensor, x_T: Tensor, generator: torch.Generator
                   ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        raise NotImplementedError

    def _outputs(self, loss: Tensor, trained_reward: Tensor, images: Tensor, reward: Tensor, cond: Tensor,
                 kl_term: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """(loss, stats, fresh) for the trainer: images and reward (B,) are the chain's final samples."""
        stats = {"reward_q": trained_reward.detach().mean(),
                 "kl_term": loss.new_zeros(()) if kl_term is None else kl_term.detach().mean()}
        return loss, stats, {"reward": reward.detach(), "cond": cond, "images": images.detach()}

    def _sample_loss(self, x0: Tensor, cond: Tensor):
        """loss = -mean r(x_0) on the chain's sample itself."""
        images = self.task.decode(x0)
        reward = self.task.reward(images, cond)
        return self._outputs(-reward.mean(), reward, images, reward, cond)


# the baselines --------------------------------------------------------------------------------------------------------
class DRaFT(ChainMethod):
    """DRaFT-K (K = draft_k, default 1): the policy's chain x_T -> x_0 with gradient through its last K transitions.
        loss = -mean r(x_0),   gradient through transitions T-K .. T-1 only
    """

    def chain_loss(self, cond, x_T, generator):
        x0 = chain(self, x_T, cond, generator, grad_from=self.schedule.num_steps - self.cfg.draft_k).x
        return self._sample_loss(x0, cond)


class DRaFTLV(ChainMethod):
    """DRaFT-LV (n = lv_samples, default 2): the DRaFT-1 sample x_0, plus n samples of the last transition re-run
    (with gradient, fresh noise) on fresh re-noisings of x_0 to the last transition's input level:
        x'_i = sqrt(a) sg(x_0) + sqrt(1 - a) e_i,  a = abar(t_{T-1}),   x_0^(i) = policy step T-1 from x'_i
        loss = -mean over x_0, x_0^(1..n) of r
    (the authors reuse the last step's stale epsilon instead of re-running the model: sqdf-method.md §11.8).
    """

    def chain_loss(self, cond, x_T, generator):
        last, n = self.schedule.num_steps - 1, self.cfg.lv_samples
        x0 = chain(self, x_T, cond, generator, grad_from=last).x
        a = self.schedule.alpha_t[last]
        noise = torch.randn((n, *x0.shape), generator=generator, device=x0.device, dtype=x0.dtype)
        renoised = (a.sqrt() * x0.detach() + (1 - a).sqrt() * noise).flatten(0, 1)   # copy i of sample b at i*B + b
        conds = cond.repeat(n, *[1] * (cond.dim() - 1))
        extra = chain(self, renoised, conds, generator, grad_from=last, start=last).x
        images = self.task.decode(torch.cat([x0, extra]))
        reward = self.task.reward(images, torch.cat([cond, conds]))
        batch = x0.shape[0]
        return self._outputs(-reward.mean(), reward, images[:batch], reward[:batch], cond)


class ReFL(ChainMethod):
    """ReFL: K ~ U{refl_lo..refl_hi} per micro-batch (default the last 6 transitions); the chain to x^(K) without
    gradient, transition K with gradient, then the policy's one-step Tweedie estimate at the timestep x^(K+1) is at:
        x0_hat = (x^(K+1) - sqrt(1 - abar(t_{K+1})) eps_theta(x^(K+1), t_{K+1})) / sqrt(abar(t_{K+1})),
        x0_hat = x^(T) when K = T - 1;     loss = -mean r(x0_hat)
    (the authors use t_K here, one step off: sqdf-method.md §11.8). That epsilon is also the next transition's, so the
    chain goes on from it to a full sample (no gradient) for logging.
    """
    estimator_name = "policy tweedie at t_{K+1}"

    def chain_loss(self, cond, x_T, generator):
        T = self.schedule.num_steps
        k = host_randint(generator, *config.refl_range(self.cfg))
        if k == T - 1:
            x0_hat = final = chain(self, x_T, cond, generator, grad_from=k).x
        else:
            end = chain(self, x_T, cond, generator, grad_from=k, stop=k + 2)
            x0_hat = ops.tweedie_x0(end.x_last, end.eps_last.combined(), self.schedule.alpha_t[k + 1])
            _, final, _ = rollout(self.policy_eps, self.schedule, end.x.detach(), cond, self.cfg.eta, generator,
                                  first_step=k + 2)
        trained = self.task.reward(self.task.decode(x0_hat), cond)
        with torch.no_grad():
            images = self.task.decode(final)
            reward = self.task.reward(images, cond)
        return self._outputs(-trained.mean(), trained, images, reward, cond)


class AlignProp(ChainMethod):
    """AlignProp, randomised truncated backpropagation: K ~ U{alignprop_min_k..alignprop_max_k} (default 1..T) per
    micro-batch, gradient through the last K transitions, every policy forward checkpointed.
        loss = -mean r(x_0)
    """

    def chain_loss(self, cond, x_T, generator):
        k = host_randint(generator, *config.alignprop_range(self.cfg))
        x0 = chain(self, x_T, cond, generator, grad_from=self.schedule.num_steps - k, checkpointed=True).x
        return self._sample_loss(x0, cond)


class DRaFTKL(ChainMethod):
    """DRaFT+KL: DRaFT-K's reward gradient plus alpha times the KL of every transition to the reference:
        loss = mean(-r(x_0) + alpha sum_j KL_j),   KL_j = mean_d (mu_theta - mu_ref)^2 / sigma_j^2 (SQDF's scale)
    One policy forward per transition, with gradient, gives both the step and its KL (the authors run it twice:
    sqdf-method.md §11.8); the reference runs without gradient, adapter off. KL_j is differentiable in transition j's
    epsilon; within the last K transitions it also reaches earlier states through that epsilon's input.
    """

    def __init__(self, task, schedule, cfg):
        super().__init__(task, schedule, cfg)
        self.require_gaussian_policy()

    def chain_loss(self, cond, x_T, generator):
        end = chain(self, x_T, cond, generator, grad_from=self.schedule.num_steps - self.cfg.draft_k, kl=True)
        images = self.task.decode(end.x)
        reward = self.task.reward(images, cond)
        kl = end.kl.to(reward.dtype)
        # sqdf_loss with k = 0, gamma = 1: mean(-r + alpha kl)
        loss = ops.sqdf_loss(reward, kl, torch.zeros_like(reward), 1.0, self.cfg.alpha)
        return self._outputs(loss, reward, images, reward, cond, kl)


METHODS.update({"draft": DRaFT, "draft-lv": DRaFTLV, "refl": ReFL, "alignprop": AlignProp, "draft-kl": DRaFTKL})
