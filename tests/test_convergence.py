"""Training with the fused ops converges like training with the torch reference (Liger-Kernel's convergence test).

The digits default, shortened to 16 steps (the reward reaches its ceiling in about 15) and evaluated on 8 samples
per class, runs once on the C++ backend and once on the reference from the same seed. The two differ only by float32
rounding, which training then amplifies, so the final metrics must agree within tolerances far inside the spread
between seeds. Measured on the 2-core CI machine with these settings (seeds 0 and 1, C++ vs reference): base reward
within 1.2e-7, final reward within 1.3e-6, diversity within 1.0e-6, fd within 5.5e-6 and KL within 6.7e-6 relative;
between seeds 0, 1 and 2 (reference) the final reward spreads by 0.072, diversity by 18%, fd by 42%, KL by 31% of
their means, and the reward rises by 1.49 to 1.87 over the base.
"""
import pytest
import torch

from sqdf_fast import config, ops
from sqdf_fast.adapters import add_policy_lora
from sqdf_fast.methods.sqdf import SQDF
from sqdf_fast.schedule import DDIMSchedule
from sqdf_fast.tasks import resolve
from sqdf_fast.train import run

# final-metric tolerances between the fused and the reference run (absolute for reward, relative otherwise): 450x or
# more the largest measured difference, and 70x or more inside the spread between seeds
REWARD_ATOL, DIVERSITY_RTOL, FD_RTOL, KL_RTOL = 1e-3, 1e-3, 3e-3, 3e-3


def fused_backend_or_skip() -> str:
    name, why = ops.backend_for("cpu")
    if name == "torch":
        pytest.skip(f"no fused CPU backend here: {why}")
    return name


def test_loss_and_gradients_match_the_reference(gen):
    """One SQDF micro-step (guided policy step, consistency estimate, reward, loss) on both backends."""
    fused_backend_or_skip()
    cfg = config.TrainConfig(guidance=2.0)
    task = resolve(cfg.task)(cfg)
    schedule = DDIMSchedule.build(task.scheduler_config, cfg.sample_steps, torch.device("cpu"))
    params = add_policy_lora(task.unet, task.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    with torch.no_grad():   # move the adapter off zero so that the KL and its gradient are non-trivial
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    method = SQDF(task, schedule, cfg)
    x = torch.randn((16, *task.sample_shape), generator=gen)
    j = torch.arange(16) % cfg.sample_steps
    cond = task.sample_conditions(16, gen)
    results = {}
    for backend in ("torch", "auto"):
        with ops.use_backend(backend):
            loss, stats = method.loss(x, j, cond, None, torch.Generator().manual_seed(1))
            grads = torch.autograd.grad(loss, params)
        results[backend] = (loss.detach(), stats["kl_term"], grads)
    (loss_ref, kl_ref, grads_ref), (loss_fused, kl_fused, grads_fused) = results["torch"], results["auto"]
    assert float(kl_ref) > 0
    torch.testing.assert_close(loss_fused, loss_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl_fused, kl_ref, rtol=1e-4, atol=1e-6)
    for g_fused, g_ref in zip(grads_fused, grads_ref):
        torch.testing.assert_close(g_fused, g_ref, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_digits_training_converges_like_the_reference(tmp_path):
    fused = fused_backend_or_skip()
    summaries = {}
    for kernels in (fused, "torch"):
        cfg = config.TrainConfig(out=str(tmp_path / kernels), steps=16, eval_per_class=8, checkpoint_every=16,
                                 progress=False, kernels=kernels)
        config.validate(cfg)
        summaries[kernels] = run(cfg)
    got, ref = summaries[fused], summaries["torch"]
    assert got["reward_base"] == pytest.approx(ref["reward_base"], abs=1e-4)   # same base samples
    assert ref["reward_final"] > ref["reward_base"] + 1.0                      # the reference run learned
    assert got["reward_final"] == pytest.approx(ref["reward_final"], abs=REWARD_ATOL)
    assert got["diversity_final"] == pytest.approx(ref["diversity_final"], rel=DIVERSITY_RTOL)
    assert got["fd_final"] == pytest.approx(ref["fd_final"], rel=FD_RTOL)
    assert got["path_kl_final"] == pytest.approx(ref["path_kl_final"], rel=KL_RTOL)
