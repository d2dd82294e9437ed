"""Argument checks and normalisation shared by the public ops: each raises ValueError naming the argument.

The public functions run them once, before any work; launchers trust what they established (contiguous tensors of
x's shape, dtype and device; per-sample values as (B,) tensors of the compute dtype). Value checks (the domain of
docs/ops.md §5: 0 < alpha_t <= alpha_prev <= 1, k >= 0, ...) run on CPU tensors and Python floats only (`readable`):
on an accelerator they would force a host sync, so device-resident schedule tables are validated once when they are
built (`sqdf_fast.schedule.DDIMSchedule`), and values outside the domain that reach a kernel give NaN for their
sample, the same on every backend.
"""
from __future__ import annotations

import struct

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
    """A Python float or a ()/(B,) tensor on x's device, values in (low_open, high] where checkable (`readable`), as
    the (B,) contiguous tensor of the compute dtype that launchers read; a float becomes a device-side fill (no host
    copy). Tensor values are checked as the kernels read them, rounded to the compute dtype."""
    tensor = _normalise(name, value, x)
    if isinstance(value, Tensor):
        if readable(tensor):
            lowest, highest = _value_range(tensor, value)
            if not (low_open < lowest and highest <= high):  # NaN fails too
                raise ValueError(f"{name} must lie in ({low_open}, {high}], got values in [{lowest}, {highest}]")
    elif not (low_open < value <= high and _survives_rounding(value, low_open, tensor.dtype)):
        raise ValueError(f"{name} must lie in ({low_open}, {high}], got {value}")
    return tensor


def step_alphas(alpha_t, alpha_prev, x: Tensor, eta: float, has_ref: bool) -> tuple[Tensor, Tensor]:
    """alpha_t, alpha_prev of a DDIM step as the launchers' (B,) tensors, after the step's domain checks on the
    values the kernels will read (rounded to the compute dtype), where readable: 0 < alpha_t <= alpha_prev <= 1 per
    sample; with a reference, alpha_prev < 1 except at the identity step alpha_t = alpha_prev (sigma > 0: the KL
    divides by sigma^2); for eta > 1, sigma^2 <= 1 - alpha_prev. docs/ops.md §5."""
    a, ap = _normalise("alpha_t", alpha_t, x), _normalise("alpha_prev", alpha_prev, x)
    at, prev = alpha_t, alpha_prev
    if not isinstance(alpha_t, Tensor):
        at = _check_alpha_float("alpha_t", alpha_t, a.dtype)
    if not isinstance(alpha_prev, Tensor):
        prev = _check_alpha_float("alpha_prev", alpha_prev, a.dtype)
    if (isinstance(at, Tensor) or isinstance(prev, Tensor)) and readable(a) and a.shape[0] == 1:
        at, prev = float(a), float(ap)  # one sample: read its values directly (a reduction costs more)
        if not (0 < at <= 1):
            raise ValueError(f"alpha_t must lie in (0.0, 1.0], got {at}")
        if not (0 < prev <= 1):
            raise ValueError(f"alpha_prev must lie in (0.0, 1.0], got {prev}")
    if isinstance(at, Tensor) or isinstance(prev, Tensor):
        if not readable(a):
            return a, ap
        at, prev = a, ap
        # three reductions check it all: min a > 0, max a' <= 1, min (a' - a) >= 0 (NaN fails each)
        highest = float(ap.amax())
        if not (float(a.amin()) > 0 and highest <= 1 and float((ap - a).amin()) >= 0):
            _explain_step_alphas(a, ap)
        deterministic = highest == 1 and bool(((ap == 1) & (a < 1)).any())
    else:  # Python numbers, read directly
        if not at <= prev:
            raise ValueError(f"alpha_prev must be >= alpha_t (a DDIM step removes noise: 0 < alpha_t <= alpha_prev <= "
                             f"1), got alpha_t = {alpha_t}, alpha_prev = {alpha_prev}")
        deterministic = prev == 1 and at < 1
    if has_ref and deterministic:
        raise ValueError("alpha_prev must be < 1 where alpha_t < alpha_prev when eps_ref is given: the step to "
                         "alpha_prev = 1 is deterministic (sigma = 0), and the KL divides by sigma^2")
    if eta > 1:
        if isinstance(at, Tensor):
            from sqdf_fast.ops.reference import ddim_coefficients
            outside = bool(ddim_coefficients(at, prev, eta)[0].isnan().any())
        else:  # plain Python (no tensor to read inside torch.compile), reference.ddim_coefficients' test of v >= 0
            eta2 = eta * eta
            outside = at < prev < 1 and not (1 - eta2) + eta2 * (at * (1 - prev) / ((1 - at) * prev)) >= 0
        if outside:
            raise ValueError(f"eta = {eta} gives sigma^2 > 1 - alpha_prev for some samples, where the DDIM step is "
                             "not defined (sigma^2 <= 1 - alpha_prev for every schedule only at eta <= 1)")
    return a, ap


def check_steps_left(k: Tensor) -> None:
    """k (the loss's steps left) >= 0 where readable; on an accelerator a negative k gives a NaN loss instead."""
    if readable(k) and not float(k.amin()) >= 0:  # NaN fails too
        raise ValueError(f"k must be >= 0 (denoising steps left), got values down to {float(k.amin())}")


def readable(t: Tensor) -> bool:
    """Whether t's values can be checked without a host sync: a CPU tensor, outside torch.compile tracing. Values on
    an accelerator are not read (the training step would wait for the device); kernels give NaN outside the domain."""
    return t.is_cpu and not torch.compiler.is_compiling()


def _normalise(name: str, value, x: Tensor) -> Tensor:
    """A float or a ()/(B,) tensor as the (B,) contiguous compute-dtype tensor on x's device (no value checks)."""
    # Every step runs this twice: each attribute read below costs tens of nanoseconds, so none is read twice.
    batch = x.shape[0]
    if isinstance(value, Tensor):
        dim = value.dim()
        if dim > 1 or (dim == 1 and value.shape[0] != batch):
            raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(value.shape)}")
        if value.is_cpu:
            if not x.is_cpu:
                raise ValueError(f"{name} is on {value.device}, expected {x.device}")
        elif value.device != x.device:
            raise ValueError(f"{name} is on {value.device}, expected {x.device}")
        ct = compute_dtype(x.dtype)
        if value.dtype != ct:  # a no-op .to() still costs about a microsecond
            value = value.to(ct)
        return value if dim == 1 and value.is_contiguous() else value.expand(batch).contiguous()
    if not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    return torch.full((batch,), float(value), dtype=compute_dtype(x.dtype), device=x.device)


def _value_range(t: Tensor, value: Tensor | None = None) -> tuple[float, float]:
    """(min, max) of the normalised t (of the original tensor `value`): one value is read directly (a quarter of
    aminmax's cost), more in one pass."""
    if value is not None and value.numel() == 1:
        return (float(value if value.dtype == t.dtype else value.to(t.dtype)),) * 2
    return (float(t),) * 2 if t.shape[0] == 1 else tuple(map(float, torch.aminmax(t)))


def _survives_rounding(value: float, low_open: float, dtype: torch.dtype) -> bool:
    """False for a float above low_open = 0 that the float32 compute dtype rounds to 0 (it cannot reorder values)."""
    return not (low_open == 0 and dtype == torch.float32 and value <= 2.0 ** -150)


def _check_alpha_float(name: str, value, dtype: torch.dtype) -> float:
    """A Python alpha in (0, 1], as the compute dtype rounds it (rounding keeps order, but may reach 0 or 1)."""
    if not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    rounded = struct.unpack("f", struct.pack("f", value))[0] if dtype == torch.float32 and 0 < value <= 1 else value
    if not 0 < rounded <= 1:
        raise ValueError(f"{name} must lie in (0.0, 1.0], got {value}" + (" (0 in float32)" if value > 0 else ""))
    return rounded


def _explain_step_alphas(a: Tensor, ap: Tensor) -> None:
    """Raises the ValueError naming what breaks 0 < alpha_t <= alpha_prev <= 1 (the checks above only know that)."""
    for name, tensor in (("alpha_t", a), ("alpha_prev", ap)):
        lowest, highest = _value_range(tensor)
        if not (0 < lowest and highest <= 1):
            raise ValueError(f"{name} must lie in (0.0, 1.0], got values in [{lowest}, {highest}]")
    gap = float((ap - a).amin())
    raise ValueError(f"alpha_prev must be >= alpha_t (a DDIM step removes noise: 0 < alpha_t <= alpha_prev <= 1), "
                     f"got alpha_prev - alpha_t down to {gap}")
