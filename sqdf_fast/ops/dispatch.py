"""Which implementation runs an op: `torch` (the reference), `cpp` (csrc/, CPU) or `triton` (kernels/, CUDA).

`auto` picks Triton for CUDA tensors, C++ for CPU tensors, and the torch reference when the preferred backend is
not there. A non-auto choice comes from `use_backend(name)` (the trainer's `--kernels` option) or else from the
environment variable SQDF_KERNELS; a choice that cannot run on the tensors' device raises instead of silently
falling back, so a benchmark or test never measures the wrong thing.
"""
from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

import torch

from sqdf_fast.ops import custom, reference

BACKENDS = ("torch", "cpp", "triton")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "SQDF_KERNELS"

_override: str | None = None


def _torch_guided_step(x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise, alpha_t, alpha_prev, eta, w):
    x_prev, kl = reference.guided_policy_step(x, eps_cond, eps_uncond, w, alpha_t, alpha_prev, eta, noise,
                                              eps_ref_cond, eps_ref_uncond)
    return x_prev, (x.new_empty((0,), dtype=alpha_t.dtype) if kl is None else kl.to(alpha_t.dtype))


TORCH_OPS = SimpleNamespace(
    guided_step=_torch_guided_step,
    x0_estimate=lambda x, eps, alpha_t, c_skip, c_out: reference.consistency_x0(
        x, eps, alpha_t, 0.0 if c_skip is None else c_skip, 1.0 if c_out is None else c_out),
    sqdf_loss=reference.sqdf_loss,
)


def check_choice(name: str, source: str = "kernels") -> str:
    if name not in CHOICES:
        raise ValueError(f"{source}={name!r}: must be one of {', '.join(CHOICES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops on `name` inside the block; `auto` leaves the choice to SQDF_KERNELS or the device."""
    global _override
    check_choice(name)
    previous, _override = _override, (None if name == "auto" else name)
    try:
        yield
    finally:
        _override = previous


def requested() -> tuple[str, str]:
    """The requested choice and where it came from."""
    if _override is not None:
        return _override, "kernels"
    env = os.environ.get(ENV_VAR)
    if env:
        return check_choice(env, ENV_VAR), ENV_VAR
    return "auto", "default"


def cpp_status() -> tuple[bool, str]:
    from sqdf_fast.ops import cpp
    return (True, "C++ extension loaded") if cpp.available() else (False, cpp.unavailable_reason())


def triton_status(device_type: str) -> tuple[bool, str]:
    try:
        import triton  # noqa: F401 -- probing only
    except ImportError as err:
        return False, f"triton not importable ({err})"
    if device_type == "cuda":
        return True, f"triton {triton.__version__} on CUDA"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {triton.__version__} in interpreter mode (TRITON_INTERPRET=1)"
    return False, "triton runs CPU tensors only in interpreter mode (set TRITON_INTERPRET=1 before importing triton)"


def resolve(device: torch.device) -> tuple[str, str]:
    """(backend, why) for tensors on `device`."""
    name, source = requested()
    if name == "auto":
        preferred = {"cuda": "triton", "cpu": "cpp"}.get(device.type)
        if preferred is None:
            return "torch", f"no fused backend for {device.type} tensors"
        ok, why = triton_status(device.type) if preferred == "triton" else cpp_status()
        return (preferred, why) if ok else ("torch", f"{preferred} unavailable: {why}")
    if name == "cpp":
        if device.type != "cpu":
            raise ValueError(f"{source}=cpp: the C++ backend runs CPU tensors only, got {device.type} tensors")
        ok, why = cpp_status()
        if not ok:
            raise ValueError(f"{source}=cpp: {why}")
    elif name == "triton":
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"{source}=triton: Triton runs CUDA tensors, got {device.type} tensors")
        ok, why = triton_status(device.type)
        if not ok:
            raise ValueError(f"{source}=triton: {why}")
    return name, f"requested by {source}"


OPS = {"torch": TORCH_OPS, "cpp": custom.register("cpp", "sqdf_fast.ops.cpp"),
       "triton": custom.register("triton", "sqdf_fast.kernels")}


def backend_ops(name: str) -> SimpleNamespace:
    return OPS[name]


def ops_for(device: torch.device) -> SimpleNamespace:
    return backend_ops(resolve(device)[0])
