"""The C++ CPU backend: launchers over the fused kernels of csrc/sqdf_cpu.cpp, loaded with ctypes.

`pip install` compiles the kernels into the shared library `sqdf_fast/_sqdf_cpu*.so` (plain C++ with OpenMP, no
torch headers) when a C++ compiler is present; without one, `available()` is False and `unavailable_reason()`
says why. The library is loaded on first use.

The launchers share one contract with the Triton backend (`sqdf_fast.kernels`); the op modules (`guided_step`,
`x0_estimate`, `loss`) give them autograd and torch.compile support and validate their inputs, so the launchers only
check, cheaply, what keeps the C code in bounds. x has shape (B, ...) with D = x.numel() // B elements per sample;
every tensor argument is contiguous, on the CPU, with x's shape and dtype (float32, float64, float16, bfloat16),
except per-sample values: (B,) tensors of the compute dtype ct (`checks.compute_dtype`: float64 for float64 x,
float32 otherwise). The kernels compute in ct, and their results do not depend on the number of threads.

- guided_step_forward(x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise, alpha_t, alpha_prev, eta, w)
  -> (x_prev, kl): the classifier-free-guided DDIM step x_prev = c_x x + c_eps eps + sigma noise, with
  eps = eps_u + w (eps_c - eps_u) (eps_c alone without eps_uncond), and kl (B,) = c_eps^2 / sigma^2 *
  mean_D (eps - eps_ref)^2, eps_ref guided alike (an empty tensor without eps_ref_cond). noise None is zero noise.
- guided_step_backward(grad_x_prev, grad_kl, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, alpha_t,
  alpha_prev, eta, w, need_x, need_eps, need_ref, need_noise) -> (grad_x, grad_eps_cond, grad_eps_uncond,
  grad_eps_ref_cond, grad_eps_ref_uncond, grad_noise), None where not needed or the input is absent.
- x0_estimate_forward(x, eps, alpha_t, c_skip, c_out) -> c_skip x + c_out (x - sqrt(1 - a) eps) / sqrt(a), with
  c_skip None = 0 and c_out None = 1; x0_estimate_backward(grad, alpha_t, c_skip, c_out, need_x, need_eps).
- sqdf_loss_forward(reward, kl, k, gamma, alpha, weight) -> 0-dim mean_b weight_b (-gamma^k_b reward_b +
  alpha kl_b), on (B,) ct vectors; sqdf_loss_backward(grad, ..., need_reward, need_kl, need_weight).
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import threading
from pathlib import Path

import torch
from torch import Tensor

from sqdf_fast.ops.checks import compute_dtype

# Written by setup.py next to where the library would be when the build failed; holds the reason.
BUILD_FAILED_NOTE = "_sqdf_cpu.build-failed.txt"

ABI_VERSION = 1  # sqdf_abi_version() of the library these launchers were written for
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_P, _I64, _F64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
_SIGNATURES = {  # name: argument types; every function returns 0, or -1 for an unsupported dtype code
    "sqdf_guided_step_forward": [_INT, _I64, _I64] + [_P] * 8 + [_F64, _F64, _P, _P, _INT],
    "sqdf_guided_step_backward": [_INT, _I64, _I64] + [_P] * 8 + [_F64, _F64] + [_P] * 6 + [_INT],
    "sqdf_x0_estimate_forward": [_INT, _I64, _I64] + [_P] * 6 + [_INT],
    "sqdf_x0_estimate_backward": [_INT, _I64, _I64] + [_P] * 6 + [_INT],
    "sqdf_loss_forward": [_INT, _I64, _P, _P, _P, _F64, _F64, _P, _P],
    "sqdf_loss_backward": [_INT, _I64, _P, _P, _P, _P, _F64, _F64, _P, _P, _P, _P],
}

_lock = threading.Lock()
_state: dict = {}  # after the first load attempt: "lib" (CDLL or None), "path", "reason"


def _library_path() -> Path | None:
    """The built library: next to this copy of the package, else wherever the import system finds
    sqdf_fast._sqdf_cpu (e.g. an editable install's mapping)."""
    package_dir = Path(__file__).resolve().parent.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (package_dir / f"_sqdf_cpu{suffix}").is_file():
            return package_dir / f"_sqdf_cpu{suffix}"
    try:
        spec = importlib.util.find_spec("sqdf_fast._sqdf_cpu")
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and Path(spec.origin).is_file() else None


def _not_built_reason() -> str:
    note = Path(__file__).resolve().parent.parent / BUILD_FAILED_NOTE
    if note.is_file():
        return f"extension not built: {note.read_text().strip()}"
    return ("extension not built: sqdf_fast/_sqdf_cpu*.so is missing (reinstall with a C++ compiler present; "
            "`pip install -v` shows the build log)")


def _load() -> ctypes.CDLL | None:
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        path, lib, reason = _library_path(), None, None
        if path is None:
            reason = _not_built_reason()
        else:
            try:
                lib = ctypes.CDLL(str(path))
                for name, argtypes in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.argtypes, fn.restype = argtypes, ctypes.c_int
                lib.sqdf_build_info.restype = ctypes.c_char_p
                abi = lib.sqdf_abi_version()
                if abi != ABI_VERSION:
                    lib, reason = None, (f"{path} was built from other sources (ABI {abi}, expected {ABI_VERSION}): "
                                         "reinstall the package")
            except (OSError, AttributeError) as err:  # unloadable, or built from other sources (missing symbol)
                lib, reason = None, f"cannot load {path}: {err}"
        _state.update(lib=lib, path=path, reason=reason)
        return lib


# Constant for torch.compile: dynamo runs these once while tracing (the dispatch layer asks them inside compiled code)
# instead of tracing into the loader.
@torch.compiler.assume_constant_result
def available() -> bool:
    return _load() is not None


@torch.compiler.assume_constant_result
def unavailable_reason() -> str | None:
    _load()
    return _state["reason"]


def build_info() -> dict:
    """{"library", "compiler", "flags", "openmp"} of the loaded library; {"library": None, "reason"} without one."""
    lib = _load()
    if lib is None:
        return {"library": None, "reason": _state["reason"]}
    info = dict(line.split("=", 1) for line in lib.sqdf_build_info().decode().splitlines())
    return {"library": str(_state["path"]), "compiler": info["compiler"], "flags": info["flags"],
            "openmp": info["openmp"] != "no"}


# --- argument plumbing -----------------------------------------------------------------------------------------
def _lib() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the C++ backend is unavailable: {_state['reason']}")
    return lib


def _ptr(t: Tensor | None, numel: int, dtype: torch.dtype) -> int | None:
    """t's data pointer after the checks that keep the C code in bounds (numel contiguous elements of dtype on the
    CPU, each a cheap attribute read: this runs for every tensor of every call); None for None."""
    if t is None:
        return None
    if t.dtype is not dtype or t.numel() != numel or not t.is_contiguous() or not t.is_cpu:
        raise ValueError(f"C++ launcher: expected a contiguous CPU tensor of {numel} elements and dtype {dtype}, "
                         f"got shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}, "
                         f"contiguous={t.is_contiguous()}")
    return t.data_ptr()


def _sizes(x: Tensor) -> tuple[int, int, int]:
    """(dtype code, B, D) of x."""
    if x.dtype not in _DTYPE_CODES or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"C++ launcher: x must be float32/float64/float16/bfloat16 with a non-empty batch "
                         f"dimension, got {x.dtype} of shape {tuple(x.shape)}")
    return _DTYPE_CODES[x.dtype], x.shape[0], x.numel() // x.shape[0]


def _check_guidance(eps_uncond: Tensor | None, eps_ref_cond: Tensor | None, eps_ref_uncond: Tensor | None) -> None:
    # One guidance flag serves policy and reference: a reference must be guided exactly when the policy is.
    if eps_ref_cond is None and eps_ref_uncond is not None or (
            eps_ref_cond is not None and (eps_uncond is None) != (eps_ref_uncond is None)):
        raise ValueError("C++ launcher: eps_ref_uncond must be given exactly when eps_uncond and eps_ref_cond are")


def _out(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _empty(like: Tensor, wanted: bool) -> Tensor | None:
    return torch.empty_like(like) if wanted else None


def _call(fn, *args) -> None:
    if fn(*args) != 0:
        raise ValueError(f"C++ launcher: {fn.__name__} rejected dtype code {args[0]}")


# --- launchers -------------------------------------------------------------------------------------------------
def guided_step_forward(x: Tensor, eps_cond: Tensor, eps_uncond: Tensor | None, eps_ref_cond: Tensor | None,
                        eps_ref_uncond: Tensor | None, noise: Tensor | None, alpha_t: Tensor, alpha_prev: Tensor,
                        eta: float, w: float) -> tuple[Tensor, Tensor]:
    lib = _lib()
    code, batch, d = _sizes(x)
    _check_guidance(eps_uncond, eps_ref_cond, eps_ref_uncond)
    ct, n, dtype = compute_dtype(x.dtype), batch * d, x.dtype
    x_prev = torch.empty_like(x)  # contiguous like x (checked below); cheaper than torch.empty(shape)
    kl = torch.empty(batch if eps_ref_cond is not None else 0, dtype=ct)
    _call(lib.sqdf_guided_step_forward, code, batch, d, _ptr(x, n, dtype), _ptr(eps_cond, n, dtype),
          _ptr(eps_uncond, n, dtype), _ptr(eps_ref_cond, n, dtype), _ptr(eps_ref_uncond, n, dtype),
          _ptr(noise, n, dtype), _ptr(alpha_t, batch, ct), _ptr(alpha_prev, batch, ct), float(eta), float(w),
          x_prev.data_ptr(), _out(kl if eps_ref_cond is not None else None), torch.get_num_threads())
    return x_prev, kl


def guided_step_backward(grad_x_prev: Tensor | None, grad_kl: Tensor | None, eps_cond: Tensor,
                         eps_uncond: Tensor | None, eps_ref_cond: Tensor | None, eps_ref_uncond: Tensor | None,
                         alpha_t: Tensor, alpha_prev: Tensor, eta: float, w: float, need_x: bool, need_eps: bool,
                         need_ref: bool, need_noise: bool) -> tuple[Tensor | None, ...]:
    lib = _lib()
    code, batch, d = _sizes(eps_cond)
    _check_guidance(eps_uncond, eps_ref_cond, eps_ref_uncond)
    ct, n, dtype = compute_dtype(eps_cond.dtype), batch * d, eps_cond.dtype
    grads = (_empty(eps_cond, need_x), _empty(eps_cond, need_eps),
             _empty(eps_cond, need_eps and eps_uncond is not None),
             _empty(eps_cond, need_ref and eps_ref_cond is not None),
             _empty(eps_cond, need_ref and eps_ref_uncond is not None), _empty(eps_cond, need_noise))
    _call(lib.sqdf_guided_step_backward, code, batch, d, _ptr(grad_x_prev, n, dtype), _ptr(grad_kl, batch, ct),
          _ptr(eps_cond, n, dtype), _ptr(eps_uncond, n, dtype), _ptr(eps_ref_cond, n, dtype),
          _ptr(eps_ref_uncond, n, dtype), _ptr(alpha_t, batch, ct), _ptr(alpha_prev, batch, ct), float(eta), float(w),
          *map(_out, grads), torch.get_num_threads())
    return grads


def x0_estimate_forward(x: Tensor, eps: Tensor, alpha_t: Tensor, c_skip: Tensor | None,
                        c_out: Tensor | None) -> Tensor:
    lib = _lib()
    code, batch, d = _sizes(x)
    ct, n = compute_dtype(x.dtype), batch * d
    x0 = torch.empty_like(x)
    _call(lib.sqdf_x0_estimate_forward, code, batch, d, _ptr(x, n, x.dtype), _ptr(eps, n, x.dtype),
          _ptr(alpha_t, batch, ct), _ptr(c_skip, batch, ct), _ptr(c_out, batch, ct), x0.data_ptr(),
          torch.get_num_threads())
    return x0


def x0_estimate_backward(grad: Tensor, alpha_t: Tensor, c_skip: Tensor | None, c_out: Tensor | None, need_x: bool,
                         need_eps: bool) -> tuple[Tensor | None, Tensor | None]:
    lib = _lib()
    code, batch, d = _sizes(grad)
    ct = compute_dtype(grad.dtype)
    grad_x, grad_eps = _empty(grad, need_x), _empty(grad, need_eps)
    _call(lib.sqdf_x0_estimate_backward, code, batch, d, _ptr(grad, batch * d, grad.dtype),
          _ptr(alpha_t, batch, ct), _ptr(c_skip, batch, ct), _ptr(c_out, batch, ct), _out(grad_x), _out(grad_eps),
          torch.get_num_threads())
    return grad_x, grad_eps


def _loss_sizes(reward: Tensor) -> tuple[int, int]:
    if reward.dtype not in (torch.float32, torch.float64) or reward.dim() != 1 or reward.shape[0] == 0:
        raise ValueError(f"C++ launcher: reward must be a non-empty float32/float64 (B,) tensor, got {reward.dtype} "
                         f"of shape {tuple(reward.shape)}")
    return _DTYPE_CODES[reward.dtype], reward.shape[0]


def sqdf_loss_forward(reward: Tensor, kl: Tensor, k: Tensor, gamma: float, alpha: float,
                      weight: Tensor | None) -> Tensor:
    lib = _lib()
    code, batch = _loss_sizes(reward)
    loss = torch.empty((), dtype=reward.dtype)
    _call(lib.sqdf_loss_forward, code, batch,
          *(_ptr(t, batch, reward.dtype) for t in (reward, kl, k)), float(gamma), float(alpha),
          _ptr(weight, batch, reward.dtype), loss.data_ptr())
    return loss


def sqdf_loss_backward(grad: Tensor, reward: Tensor, kl: Tensor, k: Tensor, gamma: float, alpha: float,
                       weight: Tensor | None, need_reward: bool, need_kl: bool,
                       need_weight: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    lib = _lib()
    code, batch = _loss_sizes(reward)
    grads = (_empty(reward, need_reward), _empty(reward, need_kl), _empty(reward, need_weight and weight is not None))
    _call(lib.sqdf_loss_backward, code, batch, _ptr(grad, 1, reward.dtype),
          *(_ptr(t, batch, reward.dtype) for t in (reward, kl, k)), float(gamma), float(alpha),
          _ptr(weight, batch, reward.dtype), *map(_out, grads))
    return grads
