"""The C++ CPU backend: launchers over the fused kernels of csrc/sqdf_cpu.cpp, a CPython extension module.

`pip install` compiles the kernels into the extension module `sqdf_fast._sqdf_cpu` (plain C++ with OpenMP and the
Python C API, no torch headers) when a C++ compiler is present; without one, `available()` is False and
`unavailable_reason()` says why. The module is imported on first use.

The launchers share one contract with the Triton backend (`sqdf_fast.kernels`); the op modules (`guided_step`,
`x0_estimate`, `loss`) give them autograd and torch.compile support and validate their inputs, so the launchers only
check, cheaply, what keeps the C code in bounds. Each launcher here is one call into the module, whose functions
take the tensors themselves (METH_FASTCALL): they run those checks in C (a ValueError naming the argument),
allocate the outputs with torch.empty/empty_like and run the kernel without the GIL.

x has shape (B, ...) with D = x.numel() // B elements per sample; every tensor argument is contiguous, on the CPU,
with x's shape and dtype (float32, float64, float16, bfloat16), except per-sample values: (B,) tensors of the compute
dtype ct (`checks.compute_dtype`: float64 for float64 x, float32 otherwise). The kernels compute the per-sample
coefficients in double (`reference.ddim_coefficients`' forms, edges and order of operations), the elements in ct, and
their results do not depend on the number of threads. Launchers read no values to validate them: a sample outside
an op's domain (docs/ops.md §5) gets NaN, as on the other backends.

- guided_step_forward(x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise, alpha_t, alpha_prev, eta, w)
  -> (x_prev, kl): the classifier-free-guided DDIM step x_prev = c_x x + c_eps eps + sigma noise, with
  eps = eps_u + w (eps_c - eps_u) (eps_c alone without eps_uncond), and kl (B,) = c_eps^2 / sigma^2 *
  mean_D (eps - eps_ref)^2, eps_ref guided alike (an empty tensor without eps_ref_cond; 0 where D = 0). noise None
  is zero noise.
- guided_step_backward(grad_x_prev, grad_kl, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, alpha_t,
  alpha_prev, eta, w, need_x, need_eps, need_ref, need_noise) -> (grad_x, grad_eps_cond, grad_eps_uncond,
  grad_eps_ref_cond, grad_eps_ref_uncond, grad_noise), None where not needed or the input is absent.
- x0_estimate_forward(x, eps, alpha_t, c_skip, c_out) -> c_skip x + c_out (x - sqrt(1 - a) eps) / sqrt(a), with
  c_skip None = 0 and c_out None = 1; x0_estimate_backward(grad, alpha_t, c_skip, c_out, need_x, need_eps).
- sqdf_loss_forward(reward, kl, k, gamma, alpha, weight) -> 0-dim mean_b weight_b (-gamma^k_b reward_b +
  alpha kl_b), on (B,) ct vectors; sqdf_loss_backward(grad, ..., need_reward, need_kl, need_weight).
"""
from __future__ import annotations

import importlib
import threading
from pathlib import Path
from types import ModuleType

import torch  # imported before the extension module, which looks up torch's allocators and dtypes
from torch import Tensor

# Written by setup.py next to where the module would be when the build failed; holds the reason.
BUILD_FAILED_NOTE = "_sqdf_cpu.build-failed.txt"
MODULE = "sqdf_fast._sqdf_cpu"
ABI_VERSION = 3  # abi_version() of the module these launchers were written for

_lock = threading.Lock()
_state: dict = {}  # after the first import attempt: "module" (or None), "path", "reason"
_ext: ModuleType | None = None  # the loaded module: what the launchers call


def _not_built_reason() -> str:
    note = Path(__file__).resolve().parent.parent / BUILD_FAILED_NOTE
    if note.is_file():
        return f"extension not built: {note.read_text().strip()}"
    return ("extension not built: sqdf_fast/_sqdf_cpu*.so is missing (reinstall with a C++ compiler present; "
            "`pip install -v` shows the build log)")


def _load() -> ModuleType | None:
    global _ext
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = path = reason = None
        try:  # the import system finds it next to this copy of the package, editable installs included
            module = importlib.import_module(MODULE)
            path = module.__file__
            abi = module.abi_version()
            if abi != ABI_VERSION:
                module, reason = None, (f"{path} was built from other sources (ABI {abi}, expected {ABI_VERSION}): "
                                        "reinstall the package")
        except ModuleNotFoundError as err:
            if err.name != MODULE:
                raise
            reason = _not_built_reason()
        except (ImportError, AttributeError) as err:  # unloadable, or built from other sources (no such function)
            path = getattr(err, "path", None) or path or MODULE
            module, reason = None, f"cannot load {path}: {err}"
        _state.update(module=module, path=path, reason=reason)
        _ext = module
        return module


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
    """{"library", "compiler", "flags", "openmp"} of the loaded module; {"library": None, "reason"} without one."""
    module = _load()
    if module is None:
        return {"library": None, "reason": _state["reason"]}
    info = dict(line.split("=", 1) for line in module.build_info().splitlines())
    return {"library": str(_state["path"]), "compiler": info["compiler"], "flags": info["flags"],
            "openmp": info["openmp"] != "no"}


def _module() -> ModuleType:
    module = _ext or _load()
    if module is None:
        raise RuntimeError(f"the C++ backend is unavailable: {_state['reason']}")
    return module


# --- launchers: one call each into the module, which checks, allocates and runs -------------------------------
def guided_step_forward(x: Tensor, eps_cond: Tensor, eps_uncond: Tensor | None, eps_ref_cond: Tensor | None,
                        eps_ref_uncond: Tensor | None, noise: Tensor | None, alpha_t: Tensor, alpha_prev: Tensor,
                        eta: float, w: float) -> tuple[Tensor, Tensor]:
    return (_ext or _module()).guided_step_forward(x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise,
                                                   alpha_t, alpha_prev, eta, w)


def guided_step_backward(grad_x_prev: Tensor | None, grad_kl: Tensor | None, eps_cond: Tensor,
                         eps_uncond: Tensor | None, eps_ref_cond: Tensor | None, eps_ref_uncond: Tensor | None,
                         alpha_t: Tensor, alpha_prev: Tensor, eta: float, w: float, need_x: bool, need_eps: bool,
                         need_ref: bool, need_noise: bool) -> tuple[Tensor | None, ...]:
    return (_ext or _module()).guided_step_backward(grad_x_prev, grad_kl, eps_cond, eps_uncond, eps_ref_cond,
                                                    eps_ref_uncond, alpha_t, alpha_prev, eta, w, need_x, need_eps,
                                                    need_ref, need_noise)


def x0_estimate_forward(x: Tensor, eps: Tensor, alpha_t: Tensor, c_skip: Tensor | None,
                        c_out: Tensor | None) -> Tensor:
    return (_ext or _module()).x0_estimate_forward(x, eps, alpha_t, c_skip, c_out)


def x0_estimate_backward(grad: Tensor, alpha_t: Tensor, c_skip: Tensor | None, c_out: Tensor | None, need_x: bool,
                         need_eps: bool) -> tuple[Tensor | None, Tensor | None]:
    return (_ext or _module()).x0_estimate_backward(grad, alpha_t, c_skip, c_out, need_x, need_eps)


def sqdf_loss_forward(reward: Tensor, kl: Tensor, k: Tensor, gamma: float, alpha: float,
                      weight: Tensor | None) -> Tensor:
    return (_ext or _module()).sqdf_loss_forward(reward, kl, k, gamma, alpha, weight)


def sqdf_loss_backward(grad: Tensor, reward: Tensor, kl: Tensor, k: Tensor, gamma: float, alpha: float,
                       weight: Tensor | None, need_reward: bool, need_kl: bool,
                       need_weight: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    return (_ext or _module()).sqdf_loss_backward(grad, reward, kl, k, gamma, alpha, weight, need_reward, need_kl,
                                                  need_weight)
