"""Argument checks and normalisation shared by the public ops: each raises ValueError naming the argument.

The public functions run them once, before any work; launchers trust what they established (contiguous tensors of
x's shape, dtype and device; per-sample values as (B,) tensors of the compute dtype). Value-range checks (e.g.
cumulative alphas in (0, 1]) run on CPU tensors and Python floats only: on an accelerator they would force a host
sync, so device-resident schedule tables are validated once when they are built (`sqdf_fast.schedule.DDIMSchedule`).
"""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend computes in for inputs of `dtype`: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, value, like: Tensor | None = None) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {value.dtype}")
    if like is not None:
        if value.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(like.shape)}")
        if value.dtype != like.dtype:
            raise ValueError(f"{name} has dtype {value.dtype}, expected {like.dtype}")
        if not same_device(value, like):
            raise ValueError(f"{name} is on {value.device}, expected {like.device}")


def same_device(a: Tensor, b: Tensor) -> bool:
    # is_cpu is a flag; .device builds a torch.device object, a third of a microsecond per tensor and call
    return a.is_cpu and b.is_cpu or a.device == b.device


def check_x(x) -> None:
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")


def per_sample(name: str, value, x: Tensor, low_open: float, high: float) -> Tensor:
    """A Python float or a ()/(B,) tensor on x's device, values in (low_open, high] where checkable, as the (B,)
    contiguous tensor of the compute dtype that launchers read; a float becomes a device-side fill (no host copy)."""
    # Every step runs this twice: each attribute read below costs tens of nanoseconds, so none is read twice.
    batch = x.shape[0]
    if isinstance(value, Tensor):
        dim = value.dim()
        if dim > 1 or (dim == 1 and value.shape[0] != batch):
            raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(value.shape)}")
        if value.is_cpu:
            if not x.is_cpu:
                raise ValueError(f"{name} is on {value.device}, expected {x.device}")
            if not torch.compiler.is_compiling():
                # one value is read directly (a quarter of aminmax's cost), more in one pass
                lowest, highest = (float(value),) * 2 if value.numel() == 1 else map(float, torch.aminmax(value))
                if not (low_open < lowest and highest <= high):  # NaN fails too
                    raise ValueError(f"{name} must lie in ({low_open}, {high}], got values in [{lowest}, {highest}]")
        elif value.device != x.device:
            raise ValueError(f"{name} is on {value.device}, expected {x.device}")
        ct = compute_dtype(x.dtype)
        if value.dtype != ct:  # a no-op .to() still costs about a microsecond
            value = value.to(ct)
        return value if dim == 1 and value.is_contiguous() else value.expand(batch).contiguous()
    if not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not low_open < value <= high:
        raise ValueError(f"{name} must lie in ({low_open}, {high}], got {value}")
    return torch.full((batch,), float(value), dtype=compute_dtype(x.dtype), device=x.device)
