"""Tasks are plug-ins: a base denoiser, an optional consistency model, a reward, an evaluator and conditions.

A task factory is a function `make(cfg) -> Task`. Built-in: `digits`, `gmm2d`, `gmm2d-ring`, `sd`, `sd-random`.
Your own: `--task my_module:make_task`. `build(cfg, device)` is the one entry point: the factory's task with
`--reward` resolved into it and every network on the device.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from sqdf_fast.memory import Checkpointed
from sqdf_fast.rewards import build_reward


@dataclass
class Task:
    name: str
    unet: nn.Module                       # base epsilon model; the policy is this plus a LoRA adapter
    # (x, t, cond) -> epsilon of `unet` (bound to that module object: the policy adapter is added to it in place)
    eps: Callable[[Tensor, Tensor, Tensor], Tensor]
    scheduler_config: dict                # a diffusers DDIMScheduler config (epsilon prediction)
    sample_shape: tuple[int, ...]         # (C, H, W) of x
    sample_conditions: Callable[[int, torch.Generator], Tensor]  # (n, generator) -> cond (n, ...)
    null_condition: Callable[[Tensor], Tensor]                  # cond -> the unconditional cond, same shape
    reward: Callable[[Tensor, Tensor], Tensor]    # (images, cond) -> (B,), differentiable in images
    decode: Callable[[Tensor], Tensor]            # x0 -> images, differentiable
    lora_targets: list[str]               # module names the policy LoRA attaches to
    # x_t, t, cond -> x0 estimate in one step, differentiable in x_t; None if the task has no consistency model
    consistency: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None
    # evaluation: features of images for diversity / Frechet distance, and real features per condition
    features: Callable[[Tensor], Tensor] | None = None
    # cond (n,) -> {class: (m, F) features}; None (no real data): fd is measured against the base model's samples
    real_features: Callable[[Tensor], dict] | None = None
    eval_conditions: Callable[[int], Tensor] | None = None  # per_class -> a fixed list of conditions
    # extra evaluation metrics where the task knows more (e.g. an exact target): (images, cond) -> {name: float};
    # they join reward, diversity, fd and kl in metrics.jsonl and summary.json (<name>_base, <name>_final)
    target_metrics: Callable[[Tensor, Tensor], dict[str, float]] | None = None
    # (images, cond, per_class, path) -> writes a PNG of evaluation samples; None: an image grid, a row per condition
    plot_samples: Callable[[Tensor, Tensor, int, Path], None] | None = None
    frozen: list[nn.Module] = field(default_factory=list)   # every frozen network, for .to(device)
    prompts: list[str] | None = None      # prompt strings indexed by cond, for text-conditioned tasks
    # the embedding of decoded images a learned proxy reward reads in black-box optimisation (sqdf_fast.bbo),
    # differentiable; None: `features`
    proxy_features: Callable[[Tensor], Tensor] | None = None

    def to(self, device: torch.device) -> "Task":
        for module in [self.unet, *self.frozen]:
            module.to(device)
        return self

    def replace_reward(self, reward: Callable[[Tensor, Tensor], Tensor]) -> None:
        """Put `reward` in place of the task's own. A task that runs its reward through `Checkpointed` (sd:
        checkpoint_reward) keeps that wrapper, so its switch applies to the new reward; a reward that is a module
        joins `frozen`, to move with the task."""
        if isinstance(self.reward, Checkpointed):
            self.reward.fn = reward
        else:
            self.reward = reward
        if isinstance(reward, nn.Module) and all(reward is not m for m in self.frozen):
            self.frozen.append(reward)


BUILTIN = {"digits": "sqdf_fast.tasks.digits:make_task", "gmm2d": "sqdf_fast.tasks.gmm2d:make_task",
           "gmm2d-ring": "sqdf_fast.tasks.gmm2d:make_ring_task", "sd": "sqdf_fast.tasks.sd:make_task",
           "sd-random": "sqdf_fast.tasks.sd:make_random_task"}


def load_callable(reference: str, what: str, args: tuple[str, ...]) -> Callable:
    """The callable named by `module:function`, checked to take the positional `args` (their names, for the
    message); ValueError naming `what` when it cannot be loaded, is not callable or takes other arguments."""
    module_name, _, func_name = reference.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{what}: cannot load {reference!r}: {err}") from err
    if not callable(target):
        raise ValueError(f"{what}={reference!r} is a {type(target).__name__}, not a callable ({', '.join(args)})")
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):   # some built-in callables have none to read
        return target
    try:
        signature.bind(*args)
    except TypeError as err:
        raise ValueError(f"{what}={reference!r} takes {signature}, but is called with ({', '.join(args)}): "
                         f"{err}") from err
    return target


def config_defaults(name: str, method: str = "sqdf") -> dict:
    """Config values a built-in task needs other than the dataclass defaults: its module's CONFIG_DEFAULTS, then
    METHOD_DEFAULTS[method] (e.g. DRaFT+KL's alpha, which weighs a sum over all T transitions)."""
    target = BUILTIN.get(name)
    if target is None:
        return {}
    module = importlib.import_module(target.partition(":")[0])
    return {**getattr(module, "CONFIG_DEFAULTS", {}), **getattr(module, "METHOD_DEFAULTS", {}).get(method, {})}


def resolve(name: str) -> Callable:
    """The task factory for a built-in name or a `module:function` reference."""
    target = BUILTIN.get(name, name)
    if ":" not in target:
        raise ValueError(f"task: unknown task {name!r}; built-in tasks are {sorted(BUILTIN)} "
                         "or give your own as module:function")
    return load_callable(target, "task", ("cfg",))


class CheckedReward:
    """A user's reward (`--reward module:function`, or a user task's own), its output checked at every call: a
    float tensor of shape (B,), carrying a gradient to the images whenever they carry one. Reads only metadata, so
    it costs no host sync; a reward that breaks the contract fails at its first call with a line naming it."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], name: str):
        self.fn, self.name = fn, name

    def __call__(self, images: Tensor, cond: Tensor) -> Tensor:
        value = self.fn(images, cond)
        expected = f"a float tensor of shape ({images.shape[0]},), one reward per image"
        if not isinstance(value, Tensor):
            raise ValueError(f"reward {self.name}: returned a {type(value).__name__}; expected {expected}")
        if tuple(value.shape) != (images.shape[0],) or not value.is_floating_point():
            raise ValueError(f"reward {self.name}: returned a {value.dtype} tensor of shape {tuple(value.shape)}; "
                             f"expected {expected}")
        if torch.is_grad_enabled() and images.requires_grad and not value.requires_grad:
            raise ValueError(f"reward {self.name}: its value carries no gradient to the images (detached, or computed "
                             "through .item(), numpy or another step without one), so fine-tuning would learn nothing "
                             "from it")
        return value


def build(cfg, device: torch.device) -> Task:
    """The complete task of cfg.task on `device`: the factory's task, checked to provide what the metrics need, with
    cfg.reward (with cfg.reward_weights) in place of its own reward unless that names the task's own (unset or
    "task"); a reward network moves to the device with the task's other frozen networks. A user's own reward (or a
    user task's own) is checked at each call (`CheckedReward`)."""
    task = resolve(cfg.task)(cfg)
    if not isinstance(task, Task):
        raise ValueError(f"task={cfg.task!r}: the factory returned a {type(task).__name__}, not a "
                         "sqdf_fast.tasks.Task")
    missing = [name for name in ("features", "eval_conditions") if getattr(task, name) is None]
    if missing:
        raise ValueError(f"task={cfg.task!r} provides no {', '.join(missing)}: the metrics need them")
    reward = build_reward(cfg.reward, weights=cfg.reward_weights, prompts=task.prompts, task_reward=task.reward,
                          device=device)
    own = reward is task.reward
    source = ("task", cfg.task) if own else ("reward", cfg.reward)
    if not callable(reward):
        raise ValueError(f"{source[0]}={source[1]!r}: the reward is a {type(reward).__name__}, not a callable "
                         "(images, cond) -> (B,)")
    if not own:
        task.replace_reward(reward)
    user = source[1] if ":" in source[1] else None   # module:function: the user's own code
    if user is not None:
        raw = task.reward.fn if isinstance(task.reward, Checkpointed) else task.reward
        task.replace_reward(CheckedReward(raw, repr(user)))
    return task.to(device)
