"""Use `sqdf_fast.ops` inside your own diffusers DDIM sampling and reward fine-tuning loop.

Three parts, top to bottom:

1. Sampling. The standard diffusers loop, `scheduler.step(eps, t, x, eta=eta, variance_noise=noise)`, and the same
   loop with `ops.policy_step`, which gives the same samples from the same noise. `ops.rollout_step` also returns
   the KL of each transition to a reference model in nats, so one pass gives the samples and their path KL.
2. Fine-tuning. A short loop of a reward-gradient method (SQDF): take one random transition j of a trajectory
   sampled without autograd, redo it with gradients (`ops.policy_step`, which also gives the KL to the frozen
   reference), estimate the clean image from the action in one step (`ops.tweedie_x0`), score it with a
   differentiable reward and minimise `ops.sqdf_loss`.
3. Evaluation: the reward of final samples and their path KL to the reference, before and after.

The model is a tiny `UNet2DModel` with random weights built from a config (nothing is downloaded), so it runs in
seconds on a CPU. Its "samples" are not images (values reach about +-100); the point is the plumbing. For a real
model, load your UNet and scheduler instead; the loops stay the same.

    python examples/diffusers_ddim_loop.py                 # about 10 s on a 2-core CPU
    python examples/diffusers_ddim_loop.py --steps 40 --device cuda
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from diffusers import DDIMScheduler, UNet2DModel
from torch import Tensor

from sqdf_fast import ops

# Tiny epsilon-prediction UNet: 3 x 16 x 16 images, two resolution levels, no attention.
UNET_CONFIG = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                   down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                   norm_num_groups=8)

# clip_sample=False: the ops do not clip x0_hat (diffusers' DDIMScheduler clips by default, which changes the step).
# set_alpha_to_one=False and steps_offset=1 (Stable Diffusion's settings): timesteps end at t=1 and the last
# transition lands on alphas_cumprod[0], so every transition keeps some noise (sigma > 0) and its KL to the
# reference is finite. With set_alpha_to_one=True (alpha 1 after the last step), or steps_offset=0 (the last step
# goes from t=0 to alphas_cumprod[0], i.e. nowhere), the last step is deterministic: the ops still match
# scheduler.step, but a KL of that step divides by sigma^2 = 0.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def build_unet(seed: int, device: torch.device | str = "cpu") -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**UNET_CONFIG).to(device).eval()


def build_scheduler(num_steps: int, **overrides) -> DDIMScheduler:
    scheduler = DDIMScheduler(**{**SCHEDULER_CONFIG, **overrides})
    scheduler.set_timesteps(num_steps)
    return scheduler


def ddim_alphas(scheduler: DDIMScheduler, device: torch.device | str = "cpu"
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(T,) timesteps t_j, previous timesteps, and the cumulative alphas at both, exactly as `DDIMScheduler.step`.

    diffusers takes the previous timestep as t - num_train_timesteps // num_inference_steps (whatever the
    timestep spacing) and, when that is negative (the last step), `final_alpha_cumprod` (1 with
    set_alpha_to_one, else alphas_cumprod[0]).
    """
    timesteps = scheduler.timesteps.long()
    prev = timesteps - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod  # float32, as scheduler.step uses it
    alpha_t = alphas[timesteps]
    alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], scheduler.final_alpha_cumprod)
    return timesteps.to(device), prev.to(device), alpha_t.to(device), alpha_prev.to(device)


# ----------------------------------------------------------------------------------------------------------------
# 1. Sampling
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_diffusers(unet: UNet2DModel, scheduler: DDIMScheduler, x: Tensor, noises: Tensor, eta: float) -> Tensor:
    """The standard diffusers DDIM loop; noises (T, B, ...) is the noise of each step."""
    for j, t in enumerate(scheduler.timesteps):
        eps = unet(x, t).sample
        x = scheduler.step(eps, t, x, eta=eta, variance_noise=noises[j]).prev_sample
    return x


@torch.no_grad()
def sample_ops(unet: UNet2DModel, scheduler: DDIMScheduler, x: Tensor, noises: Tensor, eta: float) -> Tensor:
    """The same loop with `ops.policy_step`: same samples, one fused pass per step instead of a dozen tensor ops."""
    timesteps, _, alpha_t, alpha_prev = ddim_alphas(scheduler, x.device)
    for j, t in enumerate(timesteps):
        eps = unet(x, t).sample
        x, _ = ops.policy_step(x, eps, alpha_t[j], alpha_prev[j], eta, noises[j])
    return x


@torch.no_grad()
def sample_with_kl(policy: UNet2DModel, scheduler: DDIMScheduler, x: Tensor, noises: Tensor, eta: float,
                   reference: UNet2DModel | None = None) -> tuple[Tensor, Tensor | None]:
    """Sample with `ops.rollout_step`, keep every state, and sum each transition's KL to `reference` if given.

    Returns the trajectory (T+1, B, ...) from x_T to the final sample and the path KL (B,) in nats: the KL
    between the two models' distributions over whole sampling paths, sum_j KL(pi(.|x_j) || pi_ref(.|x_j)).
    With classifier-free guidance, pass the unconditional outputs and the scale as the 3rd and 4th arguments
    (and eps_ref_uncond=...): `rollout_step` folds the guidance into the same pass.
    """
    timesteps, _, alpha_t, alpha_prev = ddim_alphas(scheduler, x.device)
    states, path_kl = [x], None
    for j, t in enumerate(timesteps):
        eps = policy(x, t).sample
        eps_ref = None if reference is None else reference(x, t).sample
        x, kl = ops.rollout_step(x, eps, None, 1.0, alpha_t[j], alpha_prev[j], eta, noises[j], eps_ref_cond=eps_ref)
        states.append(x)
        if kl is not None:
            path_kl = kl if path_kl is None else path_kl + kl
    return torch.stack(states), path_kl


# ----------------------------------------------------------------------------------------------------------------
# 2. Fine-tuning
# ----------------------------------------------------------------------------------------------------------------

def brightness_reward(images: Tensor) -> Tensor:
    """Toy differentiable reward (B,): mean pixel value. Any differentiable function of the image works here
    (a classifier's log-probability, an aesthetic model, minus a distance to a target...)."""
    return images.mean(dim=(1, 2, 3))


def sqdf_step(policy: UNet2DModel, reference: UNet2DModel, scheduler: DDIMScheduler, trajectory: Tensor,
              eta: float, alpha: float, gamma: float, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Loss of one random transition per sample of a stored trajectory; returns (loss, reward, kl_nats)."""
    timesteps, prev_timesteps, alpha_t, alpha_prev = ddim_alphas(scheduler, trajectory.device)
    num_steps, batch = timesteps.shape[0], trajectory.shape[1]
    # One transition j per sample; the ops take per-sample (B,) alphas, the UNet per-sample timesteps.
    j = torch.randint(num_steps, (batch,), generator=generator).to(trajectory.device)
    x_j = trajectory[j, torch.arange(batch, device=trajectory.device)]
    t, t_prev, a_t, a_prev = timesteps[j], prev_timesteps[j], alpha_t[j], alpha_prev[j]

    # Redo the transition with gradients; fresh noise makes the action a reparameterised sample of the policy.
    eps = policy(x_j, t).sample
    with torch.no_grad():
        eps_ref = reference(x_j, t).sample
    noise = torch.randn(x_j.shape, generator=generator).to(x_j.device)
    action, kl = ops.policy_step(x_j, eps, a_t, a_prev, eta, noise, eps_ref)

    # Soft Q without a critic: the reward of a one-step clean estimate of the action. The frozen reference's
    # Tweedie estimate at t_prev; gradients flow through its input (the action) into the policy. At the last step
    # the action is already the clean sample (the estimate computed there at t=0 is discarded).
    # The reference's parameters have requires_grad False, so backward computes no gradients for them.
    eps_next = reference(action, t_prev.clamp(min=0)).sample
    last = (j == num_steps - 1).view(-1, 1, 1, 1)
    x0 = torch.where(last, action, ops.tweedie_x0(action, eps_next, a_prev))
    reward = brightness_reward(x0)

    # k = T-1-j steps remain after this one: the discount gamma^k trusts early steps' x0 estimates less.
    # kl is the method's per-pixel scaling, (2/d) x the true KL; alpha is on that scale.
    loss = ops.sqdf_loss(reward, kl, (num_steps - 1 - j).float(), gamma, alpha)
    kl_nats = kl.detach() * x_j[0].numel() / 2
    return loss, reward.detach(), kl_nats


def fine_tune(policy: UNet2DModel, reference: UNet2DModel, scheduler: DDIMScheduler, *, steps: int, batch: int,
              eta: float, alpha: float, gamma: float, lr: float, seed: int, log=print) -> list[dict]:
    """Alternate: sample a batch of trajectories with the current policy (no autograd), train on one transition
    of each. Returns one row of metrics per optimizer step."""
    generator = torch.Generator().manual_seed(seed)
    device = next(policy.parameters()).device
    shape = (batch, UNET_CONFIG["in_channels"], UNET_CONFIG["sample_size"], UNET_CONFIG["sample_size"])
    num_steps = scheduler.num_inference_steps
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=lr)
    history = []
    for step in range(1, steps + 1):
        x_T = torch.randn(shape, generator=generator).to(device)
        noises = torch.randn((num_steps,) + shape, generator=generator).to(device)
        trajectory, _ = sample_with_kl(policy, scheduler, x_T, noises, eta)
        loss, reward, kl_nats = sqdf_step(policy, reference, scheduler, trajectory, eta, alpha, gamma, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        row = dict(step=step, loss=loss.item(), reward=reward.mean().item(), step_kl_nats=kl_nats.mean().item())
        history.append(row)
        log(f"step {step:3d}/{steps} | reward {row['reward']:+.4f} | step KL {row['step_kl_nats']:.4f} nats | "
            f"loss {row['loss']:+.4f}")
    return history


# ----------------------------------------------------------------------------------------------------------------
# 3. Evaluation and the command line
# ----------------------------------------------------------------------------------------------------------------

def evaluate(policy: UNet2DModel, reference: UNet2DModel, scheduler: DDIMScheduler, x_T: Tensor, noises: Tensor,
             eta: float) -> tuple[float, float]:
    """(mean reward of the final samples, mean path KL to the reference in nats) on fixed seeds."""
    trajectory, path_kl = sample_with_kl(policy, scheduler, x_T, noises, eta, reference)
    return brightness_reward(trajectory[-1]).mean().item(), path_kl.mean().item()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--sample-steps", type=int, default=10, help="DDIM steps T per trajectory")
    parser.add_argument("--batch", type=int, default=8, help="trajectories per optimizer step")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM stochasticity (> 0 for a KL)")
    parser.add_argument("--alpha", type=float, default=1.0, help="KL coefficient (method's per-pixel scale)")
    parser.add_argument("--gamma", type=float, default=0.9, help="reward discount gamma^(T-1-j)")
    parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.eta <= 0:
        parser.error("--eta must be > 0: the policy's KL divides by its noise variance")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    backend, why = ops.backend_for(device)
    print(f"sqdf_fast.ops backend on {device}: {backend} ({why})")

    reference = build_unet(args.seed, device).requires_grad_(False)
    scheduler = build_scheduler(args.sample_steps)

    # 1. Same noise, two loops: diffusers' scheduler.step and ops.policy_step agree to float32 rounding.
    g = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.batch, UNET_CONFIG["in_channels"], UNET_CONFIG["sample_size"], UNET_CONFIG["sample_size"])
    x_T = torch.randn(shape, generator=g).to(device)
    noises = torch.randn((args.sample_steps,) + shape, generator=g).to(device)
    diff = (sample_diffusers(reference, scheduler, x_T, noises, args.eta)
            - sample_ops(reference, scheduler, x_T, noises, args.eta)).abs().max().item()
    print(f"diffusers loop vs ops loop, T={args.sample_steps} eta={args.eta}: max |difference| {diff:.2e}")

    # 2. The policy starts as a trainable copy of the reference. For a large model use a LoRA adapter instead and
    # the same weights with the adapter disabled as the reference (one model in memory; sqdf_fast.train does this).
    policy = copy.deepcopy(reference).requires_grad_(True)
    reward_base, kl_base = evaluate(policy, reference, scheduler, x_T, noises, args.eta)
    print(f"base:       reward {reward_base:+.4f} | path KL {kl_base:.4f} nats")
    history = fine_tune(policy, reference, scheduler, steps=args.steps, batch=args.batch, eta=args.eta,
                        alpha=args.alpha, gamma=args.gamma, lr=args.lr, seed=args.seed + 2)

    # 3. Same seeds as the base evaluation: the reward rises, and the path KL says how far the policy moved.
    reward_final, path_kl_final = evaluate(policy, reference, scheduler, x_T, noises, args.eta)
    wall = time.perf_counter() - start
    print(f"fine-tuned: reward {reward_final:+.4f} | path KL {path_kl_final:.4f} nats | wall {wall:.1f} s")
    return dict(backend=backend, max_abs_diff=diff, reward_base=reward_base, reward_final=reward_final,
                path_kl_final=path_kl_final, history=history, wall_s=wall, policy=policy, reference=reference)


if __name__ == "__main__":
    main()
