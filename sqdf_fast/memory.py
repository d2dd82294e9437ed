"""Memory: device-independent accounting (bytes of tensors saved for backward, bytes of parameters held) and a
switchable gradient-checkpointing wrapper.

Both count unique storages, so a tensor saved twice, views of one tensor, or a module shared by two owners count
once; a saved view holds its whole storage alive, so the storage's size is what is counted.
"""
from __future__ import annotations

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
