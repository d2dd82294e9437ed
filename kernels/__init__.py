"""Triton kernels of the SQDF ops (CUDA; CPU tensors under TRITON_INTERPRET=1)."""
