"""Which implementation runs an op: `torch` (the reference), `cpp` (csrc/, CPU) or `triton` (kernels/, CUDA).

`auto` picks Triton for CUDA tensors, C++ for CPU tensors, and the torch reference when the preferred backend is
not there. A non-auto choice comes from `use_backend(name)` (the trainer's `--kernels` option) or else from the
environment variable SQDF_KERNELS; a choice that cannot run on the tensors' device raises instead of silently
falling back, so a benchmark or test never measures the wrong thing.

The answer is computed once per (device type, choice, environment) and cached: an op call pays a dict lookup, and
a change of `use_backend` or SQDF_KERNELS (or of TRITON_INTERPRET where Triton is asked for CPU tensors) is a
different key. Errors are not cached.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("torch", "cpp", "triton")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "SQDF_KERNELS"
LAUNCHERS = {"cpp": "sqdf_fast.ops.cpp", "triton": "sqdf_fast.kernels"}  # modules of the six launchers

_override: str | None = None
_resolved: dict[tuple, tuple[str, str]] = {}
_modules: dict[str, ModuleType] = {}


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


def _resolve(device_type: str) -> tuple[str, str]:
    name, source = requested()
    if name == "auto":
        preferred = {"cuda": "triton", "cpu": "cpp"}.get(device_type)
        if preferred is None:
            return "torch", f"no fused backend for {device_type} tensors"
        ok, why = triton_status(device_type) if preferred == "triton" else cpp_status()
        return (preferred, why) if ok else ("torch", f"{preferred} unavailable: {why}")
    if name == "cpp":
        if device_type != "cpu":
            raise ValueError(f"{source}=cpp: the C++ backend runs CPU tensors only, got {device_type} tensors")
        ok, why = cpp_status()
        if not ok:
            raise ValueError(f"{source}=cpp: {why}")
    elif name == "triton":
        if device_type not in ("cuda", "cpu"):
            raise ValueError(f"{source}=triton: Triton runs CUDA tensors, got {device_type} tensors")
        ok, why = triton_status(device_type)
        if not ok:
            raise ValueError(f"{source}=triton: {why}")
    return name, f"requested by {source}"


def resolve_type(device_type: str) -> tuple[str, str]:
    """(backend, why) for tensors on devices of `device_type`."""
    choice = _override or os.environ.get(ENV_VAR)  # reading the environment costs a microsecond: only when it counts
    interpret = os.environ.get("TRITON_INTERPRET") if choice == "triton" and device_type == "cpu" else None
    return _cached((device_type, _override, choice, interpret))


@torch.compiler.assume_constant_result  # traced once per key: compiled code holds the answer, not the lookup
def _cached(key: tuple) -> tuple[str, str]:
    found = _resolved.get(key)
    if found is None:
        found = _resolved[key] = _resolve(key[0])
    return found


def backend_of(t: torch.Tensor) -> str:
    """The backend for tensors on t's device: the ops' per-call lookup (is_cpu is a flag read; .device builds an
    object, a quarter of a microsecond)."""
    return resolve_type("cpu" if t.is_cpu else t.device.type)[0]


def resolve(device: torch.device) -> tuple[str, str]:
    """(backend, why) for tensors on `device`."""
    return resolve_type(device.type)


def launchers(name: str) -> ModuleType:
    """The launcher module of fused backend `name`, imported on first use (importing triton is slow)."""
    module = _modules.get(name)
    if module is None:
        module = _modules[name] = importlib.import_module(LAUNCHERS[name])
    return module
