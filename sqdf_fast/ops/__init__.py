"""Public SQDF ops: `policy_step`, `guided_policy_step`, `rollout_step`, `tweedie_x0`, `consistency_x0`, `sqdf_loss`.

Importable without diffusers or transformers. One module per op holds its public functions, their checks, the
autograd over the fused launchers and the custom ops torch.compile sees: `guided_step` (the DDIM step and its
variants), `x0_estimate` (Tweedie and consistency x0), `loss` (sqdf_loss). Inputs are validated (ValueError naming
the argument, `checks`) before any maths runs, the same on every backend; then the backend `dispatch` names runs
(Triton on CUDA, C++ on the CPU, the torch reference otherwise; `SQDF_KERNELS` or `use_backend` override it).
The maths of every op is in `reference`; each kernel file states its forward and backward.
"""
from __future__ import annotations

import torch

from sqdf_fast.ops import dispatch
from sqdf_fast.ops.dispatch import use_backend
from sqdf_fast.ops.guided_step import guided_policy_step, policy_step, rollout_step
from sqdf_fast.ops.loss import sqdf_loss
from sqdf_fast.ops.x0_estimate import consistency_x0, tweedie_x0

__all__ = ["policy_step", "guided_policy_step", "rollout_step", "tweedie_x0", "consistency_x0", "sqdf_loss",
           "use_backend", "backend_for"]


def backend_for(device: torch.device | str) -> tuple[str, str]:
    """(backend, why) the ops would use for tensors on `device` right now."""
    return dispatch.resolve(torch.device(device))
