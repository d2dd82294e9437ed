"""What the ops share: backend dispatch, the custom ops torch.compile sees, and compiling the ops without graph breaks.

Each op's numbers, gradients and bad input are tested in its own module (test_op_guided_step, test_op_x0_estimate,
test_op_sqdf_loss) on every backend, to the one precision rule of `ops_common`.
"""
from __future__ import annotations

import pytest
import torch
from ops_common import (  # noqa: F401 (serial_torch_unless_cpp: an autouse fixture)
    make,
    schedule_values,
    serial_torch_unless_cpp,
)

from sqdf_fast import ops
from sqdf_fast.ops import dispatch


# the custom ops themselves ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_custom_op_registration(gen, name):
    """torch.library.opcheck: schema, fake (meta) kernels and autograd registration are consistent."""
    with ops.use_backend(name):
        try:
            ops.backend_for("cpu")
        except ValueError as err:
            pytest.skip(str(err))
    shape, (a, a_prev) = (3, 4, 5), schedule_values(3)
    a, a_prev = a.float(), a_prev.float()
    x, eps_c, eps_u, ref_c, ref_u, noise = (make(gen, shape, torch.float32).requires_grad_() for _ in range(6))
    sqdf = torch.ops.sqdf
    torch.library.opcheck(sqdf.guided_step, (x, eps_c, eps_u, ref_c, ref_u, noise, a, a_prev, 0.7, 2.0, name))
    torch.library.opcheck(sqdf.guided_step, (x, eps_c, None, None, None, None, a, a_prev, 0.7, 1.0, name))
    torch.library.opcheck(sqdf.x0_estimate, (x, eps_c, a, a_prev, a, name))
    reward, kl = (torch.randn(3, generator=gen).requires_grad_() for _ in range(2))
    torch.library.opcheck(sqdf.sqdf_loss, (reward, kl, torch.tensor([2.0, 1.0, 0.0]), 0.9, 0.5, None, name))


def test_ops_compile_without_graph_breaks(backend, gen):
    """The public ops trace into one graph (custom ops are opaque to dynamo); the eager backend keeps it fast."""
    if backend == "triton":
        pytest.skip("interpreted Triton launches cannot run inside torch.compile on the CPU (environment.md)")
    a, a_prev = (v.float() for v in schedule_values(4))
    x, eps, eps_ref, noise = (make(gen, (4, 6), torch.float32) for _ in range(4))
    k = torch.tensor([3, 2, 1, 0])

    def train_step(x, eps, eps_ref, noise):
        x_prev, kl = ops.policy_step(x, eps, a, a_prev, 1.0, noise, eps_ref)
        x0 = ops.tweedie_x0(x_prev, eps, a_prev)
        return ops.sqdf_loss(x0.mean(1), kl, k, 0.9, 0.5)

    torch._dynamo.reset()
    compiled = torch.compile(train_step, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, eps, eps_ref, noise), train_step(x, eps, eps_ref, noise))

    # through AOT autograd the custom ops' registered backward runs: the same bits as the eager autograd.Function
    torch._dynamo.reset()
    compiled = torch.compile(train_step, backend="aot_eager", fullgraph=True)
    leaves, eager_leaves = ([v.clone().requires_grad_() for v in (x, eps, eps_ref, noise)] for _ in range(2))
    compiled(*leaves).backward()
    train_step(*eager_leaves).backward()
    for leaf, eager_leaf in zip(leaves, eager_leaves):
        assert torch.equal(leaf.grad, eager_leaf.grad)


def test_float_schedule_checks_compile_without_graph_breaks(backend, gen):
    """The domain checks on Python-float schedule values (docs/ops.md §5), eta > 1's included, are plain Python:
    nothing for dynamo to break on."""
    if backend == "triton":
        pytest.skip("interpreted Triton launches cannot run inside torch.compile on the CPU (environment.md)")
    x, eps, eps_ref, noise = (make(gen, (4, 6), torch.float32) for _ in range(4))

    def step(x, eps, eps_ref, noise):
        return ops.policy_step(x, eps, 0.5, 0.6, 1.3, noise, eps_ref)[1]

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, eps, eps_ref, noise), step(x, eps, eps_ref, noise))


# dispatch -----------------------------------------------------------------------------------------------------------
def test_dispatch_choice_and_overrides(monkeypatch):
    monkeypatch.delenv("SQDF_KERNELS", raising=False)
    assert ops.backend_for("cpu")[0] in ("cpp", "torch")
    assert ops.backend_for("meta")[0] == "torch"
    monkeypatch.setenv("SQDF_KERNELS", "torch")
    assert ops.backend_for("cpu") == ("torch", "requested by SQDF_KERNELS")
    with ops.use_backend("auto"):       # auto leaves the environment's choice in force
        assert ops.backend_for("cpu")[0] == "torch"
    monkeypatch.setenv("SQDF_KERNELS", "cuda")
    with pytest.raises(ValueError, match="^SQDF_KERNELS='cuda': must be one of"):
        ops.backend_for("cpu")
    with pytest.raises(ValueError, match="^kernels='fast'"):
        with ops.use_backend("fast"):
            pass


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    with ops.use_backend("cpp"), pytest.raises(ValueError, match="^kernels=cpp: the C\\+\\+ backend runs CPU"):
        ops.backend_for("meta")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with ops.use_backend("triton"), pytest.raises(ValueError, match="^kernels=triton"):
        ops.backend_for("cpu")


def test_forced_backend_runs_what_was_asked(monkeypatch, gen):
    """SQDF_KERNELS=torch really runs the reference: the C++ and Triton ops are never called."""
    calls = []
    monkeypatch.setattr(dispatch, "launchers", lambda name: calls.append(name))
    monkeypatch.setenv("SQDF_KERNELS", "torch")
    x = make(gen, (2, 3), torch.float32)
    ops.policy_step(x, x, 0.5, 0.6, 1.0, x)
    ops.tweedie_x0(x, x, 0.5)
    ops.sqdf_loss(x[:, 0], x[:, 1], torch.arange(2), 0.9, 0.1)
    assert calls == []
