"""Optional outputs of the custom ops: an op schema cannot return None, so an absent output is an empty (0,) tensor
inside the ops (`sqdf::*`, one module per op) and None everywhere else."""
from __future__ import annotations

from torch import Tensor


def empty_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty((0,)) if t is None else t


def none_if_empty(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 and t.dim() == 1 else t
