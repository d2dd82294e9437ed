"""Triton kernels of the SQDF ops (CUDA; CPU tensors under TRITON_INTERPRET=1, set before triton is imported).

Six launchers with the contract the C++ backend (`sqdf_fast.ops.cpp`) shares; the op modules of `sqdf_fast.ops`
validate their inputs and give them autograd and torch.compile support. x has shape (B, ...) with
D = x.numel() // B; every tensor is contiguous on one device with x's shape and dtype (float32, float64, float16,
bfloat16), except per-sample values: (B,) tensors of the compute dtype ct (float64 for float64 x, float32
otherwise), which the kernels read on the device. eta, w, gamma and alpha are Python floats. No launcher
synchronises with the device, so they can be captured in a CUDA graph once the autotuner has run for the shapes in
use.

- guided_step_forward(x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise, alpha_t, alpha_prev, eta, w)
  -> (x_prev, kl)
- guided_step_backward(grad_x_prev, grad_kl, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, alpha_t,
  alpha_prev, eta, w, need_x, need_eps, need_ref, need_noise) -> (grad_x, grad_eps_cond, grad_eps_uncond,
  grad_eps_ref_cond, grad_eps_ref_uncond, grad_noise)
- x0_estimate_forward(x, eps, alpha_t, c_skip, c_out) -> x0
- x0_estimate_backward(grad, alpha_t, c_skip, c_out, need_x, need_eps) -> (grad_x, grad_eps)
- sqdf_loss_forward(reward, kl, k, gamma, alpha, weight) -> loss
- sqdf_loss_backward(grad, reward, kl, k, gamma, alpha, weight, need_reward, need_kl, need_weight)
  -> (grad_reward, grad_kl, grad_weight)

The maths of each pair is in its module's docstring.
"""
from .guided_step import guided_step_backward, guided_step_forward
from .sqdf_loss import sqdf_loss_backward, sqdf_loss_forward
from .x0_estimate import x0_estimate_backward, x0_estimate_forward

__all__ = ["guided_step_forward", "guided_step_backward", "x0_estimate_forward", "x0_estimate_backward",
           "sqdf_loss_forward", "sqdf_loss_backward"]
