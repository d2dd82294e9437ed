"""Shared by the op test modules (test_op_guided_step, test_op_x0_estimate, test_op_sqdf_loss, test_ops): random
inputs, schedule values, and the one precision rule every backend is held to.

Precision rule (flash-attention's): in a low precision, a backend's error against the float64 reference of the same
rounded inputs is at most twice the error of plain PyTorch computing the reference in that precision, plus a floor
of a fraction of an ulp of the output dtype (the fused backends compute in fp32, so they usually beat the rule).
"""
from __future__ import annotations

import math

import pytest
import torch

F64 = torch.float64
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# floor of the 2x rule, relative to the output's magnitude: a fraction of one ulp of the dtype
FLOOR = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}
SHAPES = [(2, 4, 64, 64), (1, 3, 7, 5), (33, 5), (7,), (3, 5, 6)]
LAYOUTS = ("contiguous", "transposed")


def make(gen: torch.Generator, shape: tuple, dtype: torch.dtype, layout: str = "contiguous") -> torch.Tensor:
    """A random tensor rounded to dtype; 'transposed' gives a non-contiguous view of the same shape."""
    if layout == "transposed" and len(shape) >= 3:
        return torch.randn(shape[0], *shape[:0:-1], generator=gen, dtype=F64).to(dtype).transpose(1, -1)
    return torch.randn(shape, generator=gen, dtype=F64).to(dtype)


def schedule_values(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cumulative alphas spanning the whole chain (nearly pure noise to nearly clean)."""
    a_prev = torch.linspace(0.05, 0.995, batch, dtype=F64) if batch > 1 else torch.tensor([0.6], dtype=F64)
    return a_prev * torch.linspace(0.3, 0.99, batch, dtype=F64).flip(0)[:batch], a_prev


def assert_precision(name: str, got: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype):
    err = (got.double() - exact).abs().max().item()
    plain_err = (plain.double() - exact).abs().max().item()
    bound = 2 * plain_err + FLOOR[dtype] * (1 + exact.abs().max().item())
    assert err <= bound, f"{name}: error {err:.3g} > 2 x plain PyTorch's {plain_err:.3g} + floor ({dtype})"


def zeros(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype)


# csrc/sqdf_cpu.cpp's kParallelMin: the C++ kernels use torch's thread count on at least this many elements
CPP_PARALLEL_MIN = 32768


@pytest.fixture(autouse=True)
def serial_torch_unless_cpp(request):
    """Autouse in the op modules (they import it): one intra-op thread, except where a C++ kernel would go parallel
    (the cpp backend on a shape of at least CPP_PARALLEL_MIN elements, or a test without a shape parameter), so the
    op tests keep checking the C++ kernels' parallel path. Elsewhere no backend's path depends on the thread count,
    and torch's own work (references, comparisons) is too small for a thread team, which only spins and stalls when
    the cores are shared."""
    params = getattr(request.node, "callspec", None)
    params = params.params if params is not None else {}
    if "cpp" in (params.get("backend"), params.get("name")):
        shape = params.get("shape")
        if shape is None or math.prod(shape) >= CPP_PARALLEL_MIN:
            yield
            return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
