"""examples/diffusers_ddim_loop.py: the ops loop equals diffusers' DDIM loop, its KL is the true Gaussian KL, and
the fine-tuning part runs and raises the reward."""
from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from sqdf_fast import ops

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "diffusers_ddim_loop.py"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: one thread is as fast as two, and does not stall when another process holds a core
    (two OpenMP threads on a busy 2-core machine made these tests 10-70x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("diffusers_ddim_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def unet(ex):
    return ex.build_unet(seed=0)


def _inputs(ex, num_steps: int, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, ex.UNET_CONFIG["in_channels"], ex.UNET_CONFIG["sample_size"], ex.UNET_CONFIG["sample_size"])
    return torch.randn(shape, generator=g), torch.randn((num_steps,) + shape, generator=g)


# The random-weight UNet's samples reach |x| ~ 100, so the tolerance is float32 rounding relative to that scale.
def _assert_float32_close(actual, expected):
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=0, atol=2e-6 * scale)


SCHEDULERS = {
    "example": {},  # set_alpha_to_one=False, steps_offset=1
    "alpha_to_one": dict(set_alpha_to_one=True, steps_offset=0),  # diffusers' defaults: last step to alpha 1
    "trailing": dict(timestep_spacing="trailing"),
}


# auto is what the example's users get (C++ here); torch is the reference. tests/test_ops.py compares backends.
@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("variant", list(SCHEDULERS))
def test_ops_loop_matches_diffusers_loop(ex, unet, kernels, eta, variant):
    scheduler = ex.build_scheduler(4, **SCHEDULERS[variant])
    x_T, noises = _inputs(ex, 4)
    expected = ex.sample_diffusers(unet, scheduler, x_T, noises, eta)
    with ops.use_backend(kernels):
        _assert_float32_close(ex.sample_ops(unet, scheduler, x_T, noises, eta), expected)
        trajectory, path_kl = ex.sample_with_kl(unet, scheduler, x_T, noises, eta)
    assert path_kl is None and trajectory.shape == (5,) + x_T.shape
    _assert_float32_close(trajectory[-1], expected)


def test_ddim_alphas_follow_scheduler_step(ex):
    """Previous timestep t - 1000 // T, and final_alpha_cumprod after the last step."""
    for overrides, final in [({}, None), (dict(set_alpha_to_one=True), 1.0)]:
        scheduler = ex.build_scheduler(5, **overrides)
        timesteps, prev, alpha_t, alpha_prev = ex.ddim_alphas(scheduler)
        assert timesteps.tolist() == [801, 601, 401, 201, 1] and prev.tolist() == [601, 401, 201, 1, -199]
        torch.testing.assert_close(alpha_prev[:-1], scheduler.alphas_cumprod[prev[:-1]], rtol=0, atol=0)
        torch.testing.assert_close(alpha_t, scheduler.alphas_cumprod[timesteps], rtol=0, atol=0)
        assert alpha_prev[-1].item() == (scheduler.alphas_cumprod[0].item() if final is None else final)


def test_rollout_kl_is_the_true_gaussian_kl(ex, unet):
    """Path KL from `ops.rollout_step` = sum_j sum_d (mu - mu_ref)^2 / (2 sigma_j^2), with the means and sigma_j
    taken from diffusers' scheduler.step in float64."""
    policy = copy.deepcopy(unet)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    scheduler = ex.build_scheduler(4)
    eta = 0.8
    x_T, noises = _inputs(ex, 4)
    trajectory, path_kl = ex.sample_with_kl(policy, scheduler, x_T, noises, eta, reference=unet)

    expected = torch.zeros(x_T.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for j, t in enumerate(scheduler.timesteps):
            x = trajectory[j]
            eps, eps_ref = policy(x, t).sample.double(), unet(x, t).sample.double()
            x64, zeros = x.double(), torch.zeros_like(x, dtype=torch.float64)
            mu = scheduler.step(eps, t, x64, eta=eta, variance_noise=zeros).prev_sample
            mu_ref = scheduler.step(eps_ref, t, x64, eta=eta, variance_noise=zeros).prev_sample
            sigma = scheduler.step(eps, t, x64, eta=eta, variance_noise=torch.ones_like(zeros)).prev_sample - mu
            expected += ((mu - mu_ref) / sigma).square().sum(dim=(1, 2, 3)) / 2
    assert (expected > 1).all()  # the perturbation moves the policy measurably
    torch.testing.assert_close(path_kl.double(), expected, rtol=2e-3, atol=1e-6)


def test_main_fine_tunes(ex, capsys):
    # alpha 0.1: six steps of a small batch raise the reward on every seed tried (40 seeds, smallest gain 0.67).
    m = ex.main(["--steps", "6", "--sample-steps", "4", "--batch", "4", "--alpha", "0.1", "--device", "cpu",
                 "--seed", "0"])
    out = capsys.readouterr().out
    assert m["backend"] == ops.backend_for("cpu")[0] and f"backend on cpu: {m['backend']}" in out
    assert m["max_abs_diff"] < 1e-3
    assert len(m["history"]) == 6
    values = [m["reward_base"], m["reward_final"], m["path_kl_final"]]
    values += [row[key] for row in m["history"] for key in ("loss", "reward", "step_kl_nats")]
    assert all(math.isfinite(v) for v in values)
    # The policy moved away from the reference, toward a higher reward on the same evaluation seeds.
    changed = any(not torch.equal(p, q) for p, q in zip(m["policy"].parameters(), m["reference"].parameters()))
    assert changed and m["path_kl_final"] > 0
    assert m["reward_final"] > m["reward_base"] + 1.0


# ---- examples/python_api.py: the Python API (docs/api.md) ------------------------------------------------------
def test_python_api_example_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("python_api", EXAMPLE.parent / "python_api.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "run"
    result = example.main(["--steps", "2", "--out", str(out)])
    assert (result["first"]["steps"], result["summary"]["steps"]) == (2, 4)
    results = result["results"]
    assert results.summary == result["summary"] and results.config.steps == 4   # the resume recorded its change
    assert [step for step, _ in results.curve("reward")] == [2, 4]
    assert [row for row in results.metrics if "resumed_with" in row] == [{"step": 2, "resumed_with":
                                                                         {"steps": [2, 4]}}]
    assert result["images"].shape == result["base_images"].shape == (20, 1, 16, 16)
    assert not torch.equal(result["images"], result["base_images"]) and result["lora"] is None
    assert (out / "more_samples.png").is_file()
    assert "reward" in capsys.readouterr().out

    # sample_run's defaults redraw the run's own final evaluation samples, bit for bit
    from sqdf_fast import sample_run
    sample_run(out, out=tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes() == (out / "samples_final.png").read_bytes()
