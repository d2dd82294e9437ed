"""Oracles: the true reward of black-box optimisation, which gives no gradient and is queried in batches.

An oracle is called as `oracle(images, cond) -> (B,)` with the task's decoded images (digits and SD images in the
task's own range, gmm2d points) under `torch.no_grad()`. `Oracle` wraps any such function: it calls it in batches
of `batch_size`, checks every answer (shape, numbers, finite) and names the oracle and the batch when one is wrong.

Built-in (docs/bbo.md explains each):

    compactness   digits: the share of a digit's ink inside the central 8x8 window of the 16x16 image (hard
                  thresholds and counts: no gradient exists). 1 is a small, centred digit.
    task          the task's own reward, queried point-wise without its gradient (gmm2d, gmm2d-ring: the exact
                  reward whose target p* is known; sd: the LAION aesthetic score, random weights in sd-random)
    auto          compactness on digits, task elsewhere
    module:function   your own: f(images, cond) -> (B,) tensor, NumPy array or list of floats; images
                  (B, C, H, W) in [0, 1] for image tasks, points (B, 2) for gmm2d
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from sqdf_fast.memory import Checkpointed
from sqdf_fast.tasks import Task, load_callable

BUILTIN_ORACLES = ("auto", "compactness", "task")
INK_THRESHOLD = 0.0        # digits pixels are in [-1, 1]: ink is more than half intensity
CENTRE = slice(4, 12)      # the central 8x8 window of a 16x16 digit


def compactness(images: Tensor, cond: Tensor) -> Tensor:
    """Share of the ink pixels (value > 0 in [-1, 1]) that lie in the central 8x8 window; 0 for an empty image."""
    ink = images > INK_THRESHOLD
    inside = ink[..., CENTRE, CENTRE].flatten(1).sum(1)
    return inside.float() / ink.flatten(1).sum(1).clamp(min=1).float()


class OracleError(ValueError):
    """An oracle raised or answered wrongly; names the oracle and the batch."""


class Oracle:
    """A black-box reward called in batches, its answers checked: `oracle(images, cond, first_row) -> (B,) float64`.

    With `drop_nonfinite`, a NaN/Inf answer becomes NaN in the result (the caller drops and counts it) instead of
    an error."""

    def __init__(self, name: str, fn: Callable, batch_size: int, images_01: bool, drop_nonfinite: bool = False):
        self.name, self.fn, self.batch_size = name, fn, batch_size
        self.images_01, self.drop_nonfinite = images_01, drop_nonfinite

    def __call__(self, images: Tensor, cond: Tensor, first_row: int = 0) -> Tensor:
        return torch.cat([self.query(images[i:i + self.batch_size], cond[i:i + self.batch_size], first_row + i)
                          for i in range(0, images.shape[0], self.batch_size)])

    @torch.no_grad()
    def query(self, images: Tensor, cond: Tensor, first_row: int = 0) -> Tensor:
        """One batch (at most batch_size rows): float64 labels on the CPU."""
        n = images.shape[0]
        where = f"oracle {self.name!r}, batch of rows {first_row}..{first_row + n - 1}"
        shown = (images.float() + 1) / 2 if self.images_01 else images
        try:
            answer = self.fn(shown, cond)
        except Exception as err:   # any failure of user code: named, with what was kept
            raise OracleError(f"{where} raised {type(err).__name__}: {err}") from err
        try:
            labels = torch.as_tensor(np.asarray(answer.detach().cpu() if isinstance(answer, Tensor) else answer,
                                                dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise OracleError(f"{where} returned {type(answer).__name__}, not numbers: {err}") from err
        if labels.shape != (n,):
            raise OracleError(f"{where} returned shape {tuple(labels.shape)}, expected ({n},)")
        bad = ~torch.isfinite(labels)
        if bad.any() and not self.drop_nonfinite:
            raise OracleError(f"{where} returned {int(bad.sum())} non-finite value(s) (first at row "
                              f"{first_row + int(bad.nonzero()[0])}); --drop-nonfinite-labels drops and counts them")
        return labels


def task_reward(task: Task) -> Callable[[Tensor, Tensor], Tensor]:
    """The task's reward as built, before any proxy takes its place (unwrapped from its checkpointing)."""
    return task.reward.fn if isinstance(task.reward, Checkpointed) else task.reward


def build_oracle(spec: str, task: Task, batch_size: int, drop_nonfinite: bool = False) -> Oracle:
    """The oracle `spec` names for `task` (call before the task's reward is replaced by a proxy)."""
    name = ("compactness" if task.name == "digits" else "task") if spec == "auto" else spec
    if name == "compactness":
        if task.name != "digits":
            raise ValueError(f"oracle=compactness: scores 16x16 digits, not task {task.name!r}")
        return Oracle(name, compactness, batch_size, images_01=False, drop_nonfinite=drop_nonfinite)
    if name == "task":
        return Oracle(f"task ({task.name})", task_reward(task), batch_size, images_01=False,
                      drop_nonfinite=drop_nonfinite)
    if ":" not in name:
        raise ValueError(f"oracle={spec!r}: built-in oracles are {', '.join(BUILTIN_ORACLES)}, or module:function")
    # a user's oracle sees images in [0, 1]; digits decode to [-1, 1], sd to [0, 1] already, gmm2d to points
    return Oracle(name, load_callable(name, "oracle", ("images", "cond")), batch_size, images_01=task.name == "digits",
                  drop_nonfinite=drop_nonfinite)
