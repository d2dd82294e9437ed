"""Pieces shared by the kernel files: tiling, launch configurations and compute dtypes.

Tiling. x is viewed as a (B, D) matrix. A program owns a ROWS x COLS tile of it (ROWS * COLS = TILE, powers of
two): COLS = min(TILE, next_power_of_2(D)) columns of ROWS = TILE / COLS consecutive samples. Large samples are
split into cdiv(D, COLS) chunks of one row each; small ones (D < TILE) are packed several to a program, so a batch
of tiny samples does not launch one mostly idle program per sample. The 1-D grid has cdiv(B, ROWS) * cdiv(D, COLS)
programs, ordered (row block, chunk). Per-sample values are loaded once per row as a (ROWS,) vector and broadcast.
Element offsets are 64-bit (B * D may exceed 2^31).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sqdf_fast.ops.checks import compute_dtype

# TRITON_INTERPRET is read by triton at import time; this module is imported after triton.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The value of a sample outside an op's domain (docs/ops.md §5), as a constant kernels can use.
NAN = tl.constexpr(float("nan"))

# The interpreter pays about 1 ms per program instance and cannot autotune more than one config, so one large
# tile. On a GPU the streaming kernels are memory-bound; the autotuner picks tile size and warps per D.
INTERPRET_TILE = 8192
ELEMENTWISE_CONFIGS = ([triton.Config({"TILE": INTERPRET_TILE})] if INTERPRET else
                       [triton.Config({"TILE": tile}, num_warps=warps)
                        for tile, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8))])


def tile_cols(d: int, tile: int) -> int:
    """COLS of a TILE-element tile over samples of d elements."""
    return min(tile, triton.next_power_of_2(d))


def tile_grid(batch: int, d: int):
    """Launch grid of a tiled kernel, from its launch parameters TILE and COLS."""
    return lambda meta: (triton.cdiv(batch, meta["TILE"] // meta["COLS"]) * triton.cdiv(d, meta["COLS"]),)


def elementwise(kernel):
    """Launch configuration of a tiled elementwise kernel (one whose results do not depend on its tile):
    autotuned TILE, COLS derived from it and D."""
    with_cols = triton.heuristics({"COLS": lambda args: tile_cols(args["D"], args["TILE"])})(kernel)
    return triton.autotune(configs=ELEMENTWISE_CONFIGS, key=["D"])(with_cols)


def compute_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """The compute dtype (`sqdf_fast.ops.checks.compute_dtype`) of inputs of `dtype`, as (torch, triton) dtypes."""
    ct = compute_dtype(dtype)
    return ct, (tl.float64 if ct == torch.float64 else tl.float32)


def batch_dims(x: torch.Tensor) -> tuple[int, int]:
    """(B, D) of x: B samples of D = numel / B elements each."""
    return x.shape[0], x.numel() // x.shape[0]


@triton.jit
def scalar_arg(value, CT: tl.constexpr):
    """A float kernel argument in the compute dtype, rounded once. Parameters annotated tl.float64 arrive as float64
    on the GPU; the interpreter passes Python floats, which tl.cast would round through float32 but addition to a
    float64 keeps exact."""
    return (tl.full([], 0.0, tl.float64) + value).to(CT)


@triton.jit
def sample_tile(B, D, TILE: tl.constexpr, COLS: tl.constexpr):
    """(rows, offs, mask) of this program's tile: sample indices (ROWS,), element offsets and mask (ROWS, COLS)."""
    ROWS: tl.constexpr = TILE // COLS
    pid = tl.program_id(0)
    n_chunks = (D + COLS - 1) // COLS
    row_block = pid // n_chunks
    rows = row_block * ROWS + tl.arange(0, ROWS)
    cols = (pid - row_block * n_chunks) * COLS + tl.arange(0, COLS)
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    return rows, offs, (rows < B)[:, None] & (cols < D)[None, :]


@triton.jit
def load_per_sample(ptr, rows, B, CT: tl.constexpr):
    # Rows past the batch read the last sample (their stores are masked), so no lane computes on garbage.
    return tl.load(ptr + tl.minimum(rows, B - 1)).to(CT)


# The interpreter's bfloat16 conversions are not the GPU's: it truncates float32 to bfloat16 (ignoring
# fp_downcast_rounding) and mis-converts subnormals both ways. Interpreted kernels therefore move bfloat16 as its
# 16 bits and convert by bit arithmetic, exactly as the GPU converts, so that CPU tests check what the GPU computes.
BF16_AS_BITS = tl.constexpr(INTERPRET)


@triton.jit
def _bf16_bits_to_float32(bits):
    return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _float32_to_bf16_bits(value):
    """The bits of value rounded to nearest even at bfloat16 precision (overflow to inf; NaN stays NaN)."""
    bits = value.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(value != value, (bits >> 16) | 0x40, rounded).to(tl.uint16)


@triton.jit
def load_tile(ptr, offs, mask, CT: tl.constexpr):
    # Masked lanes read 0 so that reductions over a ragged tile need no extra select.
    if BF16_AS_BITS and ptr.dtype.element_ty == tl.bfloat16:
        bits = tl.load(ptr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        return _bf16_bits_to_float32(bits).to(CT)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(CT)


@triton.jit
def store_tile(ptr, offs, mask, value):
    if BF16_AS_BITS and ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr.to(tl.pointer_type(tl.uint16)) + offs, _float32_to_bf16_bits(value.to(tl.float32)), mask=mask)
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)
