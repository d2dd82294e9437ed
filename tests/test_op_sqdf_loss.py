"""The discounted loss (`ops.sqdf_loss`; sqdf_fast/ops/loss.py) on every backend x dtype x batch against the float64
reference; the discount applies to the reward only; gradcheck in float64; bad input.
"""
from __future__ import annotations

import math

import pytest
import torch
from ops_common import F64, serial_torch_unless_cpp, zeros  # noqa: F401 (serial_torch_unless_cpp: an autouse fixture)

from sqdf_fast import ops
from sqdf_fast.ops import dispatch, reference


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("batch", [1, 33])
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_sqdf_loss_forward_backward(backend, gen, dtype, batch, weighted):
    reward, kl = (torch.randn(batch, generator=gen, dtype=dtype).requires_grad_() for _ in range(2))
    weight = torch.rand(batch, generator=gen, dtype=dtype).requires_grad_() if weighted else None
    k = torch.randint(0, 20, (batch,), generator=gen)
    inputs = [reward, kl] + ([weight] if weighted else [])
    got = ops.sqdf_loss(reward, kl, k, 0.9, 0.7, weight)
    exact_inputs = [v.detach().double().requires_grad_() for v in inputs]
    exact = reference.sqdf_loss(exact_inputs[0], exact_inputs[1], k, 0.9, 0.7, exact_inputs[2] if weighted else None)
    assert got.shape == () and got.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), exact, **tol)
    for g, e in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(exact, exact_inputs)):
        torch.testing.assert_close(g.double(), e, **tol)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5])
def test_sqdf_loss_discounts_the_reward_only(gen, backend, gamma, weighted):
    num_steps, alpha = 10, 0.3
    j = torch.tensor([0, 3, 8, 9, 9])
    k = num_steps - 1 - j  # steps left: T - 1 for the first transition, 0 for the last
    reward, kl = torch.randn(5, generator=gen, dtype=F64), torch.randn(5, generator=gen, dtype=F64).abs()
    weight = torch.rand(5, generator=gen, dtype=F64) if weighted else None
    w = weight.tolist() if weighted else [1.0] * 5
    expected = sum(w[i] * (-gamma ** int(k[i]) * float(reward[i]) + alpha * float(kl[i])) for i in range(5)) / 5
    assert float(ops.sqdf_loss(reward, kl, k, gamma, alpha, weight)) == pytest.approx(expected, rel=1e-12)


def test_gradcheck_sqdf_loss(backend, gen):
    reward, kl, weight = (torch.randn(5, generator=gen, dtype=F64).requires_grad_() for _ in range(3))
    k = torch.tensor([4, 3, 2, 1, 0])
    assert torch.autograd.gradcheck(lambda r, kl, w: ops.sqdf_loss(r, kl, k, 0.8, 0.3, w), (reward, kl, weight))
    # a weight that needs no gradient
    assert torch.autograd.gradcheck(lambda r, kl: ops.sqdf_loss(r, kl, k, 0.8, 0.3, weight.detach()), (reward, kl))


@pytest.mark.parametrize("override, match", [
    *(pytest.param(dict(gamma=g), "gamma", id=f"gamma={g}") for g in (0, 1.5, -0.1)),
    pytest.param(dict(alpha=-0.5), "^alpha", id="negative alpha"),
    pytest.param(dict(reward=zeros(4, 1, dtype=F64), kl=zeros(4, 1, dtype=F64), k=torch.zeros(4, 1)), "^reward",
                 id="reward shape"),
    pytest.param(dict(kl=zeros(3, dtype=F64)), "^kl", id="kl shape"),
    pytest.param(dict(k=torch.arange(3)), "^k ", id="k shape"),
    pytest.param(dict(weight=zeros(2, dtype=F64)), "^weight", id="weight shape"),
    pytest.param(dict(k=torch.tensor([3, 2, -1, 0])), "^k must be >= 0", id="negative k"),
    pytest.param(dict(k=torch.tensor([3.0, math.nan, 1.0, 0.0])), "^k must be >= 0", id="NaN k"),
    pytest.param(dict(k=torch.tensor([-0.5, 2.0, 1.0, 0.0], dtype=F64)), "^k must be >= 0", id="negative float k"),
])
def test_sqdf_loss_rejects_bad_input(backend, override, match):
    args = dict(reward=zeros(4, dtype=F64), kl=zeros(4, dtype=F64), k=torch.arange(4), gamma=0.9, alpha=0.1,
                weight=None)
    with pytest.raises(ValueError, match=match):
        ops.sqdf_loss(**{**args, **override})


@pytest.mark.parametrize("name", ("torch", "cpp", "triton"))
def test_negative_k_unchecked_gives_nan(name, gen):
    """A k on a device is not read (docs/ops.md §5): below the checks, a negative k makes the loss NaN on every
    backend (gamma^k would otherwise be a silent > 1 'discount'), and its sample's reward and weight gradients."""
    if name == "triton" and dispatch.triton_status("cpu")[0] is False:
        pytest.skip("triton not in interpreter mode")
    reward, kl, weight = (torch.randn(4, generator=gen, dtype=F64) for _ in range(3))
    k = torch.tensor([3.0, -1.0, 0.0, 2.0], dtype=F64)
    if name == "torch":
        assert reference.sqdf_loss(reward, kl, k, 0.9, 0.5, weight).isnan()
        return
    launch = dispatch.launchers(name)
    assert launch.sqdf_loss_forward(reward, kl, k, 0.9, 0.5, weight).isnan()
    g_reward, g_kl, g_weight = launch.sqdf_loss_backward(torch.ones((), dtype=F64), reward, kl, k, 0.9, 0.5, weight,
                                                         True, True, True)
    assert g_reward.isnan().tolist() == [False, True, False, False] and g_weight.isnan()[1] and g_kl.isfinite().all()
