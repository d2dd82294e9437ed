"""Memory: device-independent accounting (bytes of tensors saved for backward, bytes of parameters held), a
switchable gradient-checkpointing wrapper, and the CPU allocator setting the trainer runs with.

Both count unique storages, so a tensor saved twice, views of one tensor, or a module shared by two owners count
once; a saved view holds its whole storage alive, so the storage's size is what is counted.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def _storage_key(t: Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return str(t.device), storage.data_ptr()


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> tuple[Any, int]:
    """Run `fn()` and count the bytes of the distinct storages autograd saves for its backward pass.

    `exclude`: tensors whose storage is held anyway (pass the models' parameters: a matmul saves its weight, which
    costs nothing extra). Work inside a non-reentrant `torch.utils.checkpoint` region saves nothing here (the
    checkpoint's own hooks keep recomputation handles instead), which is exactly the saving checkpointing buys.
    Returns (fn's result, bytes).
    """
    skip = {_storage_key(t) for t in exclude}
    seen: dict[tuple[str, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in skip and key[1] != 0:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(seen.values())


def parameter_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the distinct parameter and buffer storages of `modules` (shared modules and tied weights once)."""
    seen: dict[tuple[str, int], int] = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


class Checkpointed:
    """`fn`, gradient-checkpointed (its activations recomputed in the backward pass instead of kept) while `enabled`
    and gradients are being recorded. A task wraps its decoder and reward in it; `fn` and `enabled` may be changed
    after the task's factory made it (`Task.replace_reward` puts a `--reward` into `fn`; bench/checkpoint_memory.py
    flips `enabled`)."""

    def __init__(self, fn: Callable, enabled: bool):
        self.fn, self.enabled = fn, enabled

    def __call__(self, *args):
        if self.enabled and torch.is_grad_enabled():
            return checkpoint(self.fn, *args, use_reentrant=False)
        return self.fn(*args)


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_MAX = 32 * 2**20   # glibc's upper limit on 64-bit systems


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of returning them to the OS.

    By default blocks of a few MiB (a batch's activations) are mmap-ed, unmapped when freed and page-faulted in
    again, zero-filled, by the next allocation of the same size: on the default job about 2.7 million page faults
    and 5 s of system time, a tenth of its wall time. Served from the heap up to 32 MiB, with the heap never trimmed,
    they are reused; the process keeps its peak heap (about 10% more resident memory there). No result changes.
    Returns whether it applied (glibc only; elsewhere nothing is changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # not glibc (e.g. musl)
        return False
    return all(mallopt(param, value) == 1 for param, value in
               ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 64 * 2**20)))
