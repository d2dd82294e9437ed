"""CUDA-graph-captured guided DDIM rollouts that stay valid across policy (LoRA) updates.

`GraphRollout(denoiser, schedule, eta, modules)` is a drop-in for `sqdf_fast.rollout.rollout` without a reference
denoiser: `graph_rollout(x_T, cond, generator) -> (states, x0, None)`, the same values as the eager loop for the
same generator.

How it works (CUDA):
- one `torch.cuda.CUDAGraph` per captured key (batch size, sample shape, dtypes, condition shape), cached; the
  graph holds the WHOLE T-step loop (every UNet call, the fused guidance + DDIM step, the state writes: the same
  `sqdf_fast.rollout.ddim_chain` the eager sampler runs). Capturing the loop as one graph costs about one step's
  activations (the capture's private pool reuses freed blocks across steps), plus the static buffers;
- static buffers: x_T, cond, the per-step noise (T, B, ...) and the outputs (states (B, T, ...), x0). A replay
  copies the new x_T and cond in, draws the T noises with the caller's generator EXACTLY as the eager loop does
  (one `torch.randn(x.shape, generator=...)` per step, in step order; the denoiser never uses the generator, so
  drawing them all up front gives the same numbers), replays, and returns clones of the outputs (set
  `clone_outputs=False` to get the static buffers themselves, valid until the next call);
- the schedule tables are already on the device (`DDIMSchedule`), the step's coefficients are gathered there;
- warm-up: the loop runs twice eagerly on a side stream (Triton compilation, cuDNN/cuBLAS workspace, lazy init),
  then it is captured.

Why it survives LoRA updates: the graph reads every weight from its storage at replay time, so a weight changed IN
PLACE (the optimizer's `p.add_`/`p.copy_`/foreach/fused updates, `copy_adapter_in_place`) is seen by the next
replay. What the graph does NOT see: a parameter given new storage (`p.data = ...`, `module.to(...)`,
`load_state_dict(assign=True)`, re-injecting an adapter), or a change of Python-level state baked in at capture
(which adapters are active or disabled, the LoRA scaling, the op backend): build a new GraphRollout after
changing those. Loading a checkpoint into a model whose
rollout is captured must therefore use `sqdf_fast.adapters.copy_adapter_in_place`. As a guard, every call checks
the storage addresses of the watched `modules`' parameters and buffers (a few hundred `data_ptr()` reads) and
re-captures when any changed (`recaptures` counts it).

Falls back to the eager `rollout` (same results) off CUDA, and whenever `enabled` is False. A new batch size is
captured on first use (set `max_graphs` to bound the cache; beyond it, the eager loop runs).

`emulate=True` runs the static-buffer path (pre-drawn noise, copies into the static inputs, the same body the graph
captures) WITHOUT capturing, on any device: the CPU tests check it equals the eager rollout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sqdf_fast.rollout import GuidedDenoiser, ddim_chain, rollout
from sqdf_fast.schedule import DDIMSchedule

WARMUP_RUNS = 2


def _storage_fingerprint(modules: list[nn.Module]) -> tuple:
    return tuple(t.data_ptr() for m in modules for t in (*m.parameters(), *m.buffers()))


@dataclass
class _Captured:
    x_T: Tensor
    cond: Tensor
    noise: Tensor            # (T, B, ...)
    states: Tensor           # (B, T, ...)
    x0: Tensor
    graph: "torch.cuda.CUDAGraph | None"


class GraphRollout:
    """A guided DDIM sampler with the loop captured as CUDA graphs (module docstring)."""

    def __init__(self, denoiser: GuidedDenoiser, schedule: DDIMSchedule, eta: float,
                 modules: list[nn.Module] | None = None, enabled: bool = True, emulate: bool = False,
                 clone_outputs: bool = True, max_graphs: int = 8):
        self.denoiser, self.schedule, self.eta = denoiser, schedule, float(eta)
        self.modules = list(modules or [])
        self.enabled, self.emulate, self.clone_outputs, self.max_graphs = enabled, emulate, clone_outputs, max_graphs
        self._cache: dict[tuple, _Captured] = {}
        self._fingerprint: tuple | None = None
        self.captures = 0      # graphs captured (or emulated buffer sets built)
        self.recaptures = 0    # cache drops because a watched parameter got new storage
        self.replays = 0
        self.eager_calls = 0

    # ---- public ------------------------------------------------------------------------------------------------
    def uses_graph(self, x_T: Tensor) -> bool:
        return self.enabled and (self.emulate or (x_T.is_cuda and torch.cuda.is_available()))

    def __call__(self, x_T: Tensor, cond: Tensor, generator: torch.Generator | None
                 ) -> tuple[Tensor, Tensor, None]:
        if not self.uses_graph(x_T):
            self.eager_calls += 1
            return rollout(self.denoiser, self.schedule, x_T, cond, self.eta, generator)
        self._check_storages()
        key = (tuple(x_T.shape), x_T.dtype, x_T.device, tuple(cond.shape), cond.dtype)
        captured = self._cache.get(key)
        if captured is None:
            if len(self._cache) >= self.max_graphs:
                self.eager_calls += 1
                return rollout(self.denoiser, self.schedule, x_T, cond, self.eta, generator)
            captured = self._capture(x_T, cond)
            self._cache[key] = captured
        return self._replay(captured, x_T, cond, generator)

    # ---- internals ---------------------------------------------------------------------------------------------
    def _check_storages(self) -> None:
        fingerprint = _storage_fingerprint(self.modules)
        if self._fingerprint is not None and fingerprint != self._fingerprint and self._cache:
            self._cache.clear()
            self.recaptures += 1
        self._fingerprint = fingerprint

    @torch.no_grad()
    def _body(self, c: _Captured) -> None:
        """The loop the graph captures: the one DDIM chain on static buffers (pre-drawn noise in, states and x0 out),
        no host sync, no allocation that outlives it."""
        end = ddim_chain(self.denoiser, self.schedule, c.x_T, c.cond, self.eta, lambda j, x: c.noise[j],
                         states=c.states)
        c.x0.copy_(end.x)

    @torch.no_grad()
    def _capture(self, x_T: Tensor, cond: Tensor) -> _Captured:
        steps = self.schedule.num_steps
        c = _Captured(x_T=x_T.detach().clone(), cond=cond.detach().clone(),
                      noise=torch.zeros((steps, *x_T.shape), dtype=x_T.dtype, device=x_T.device),
                      states=torch.empty((x_T.shape[0], steps, *x_T.shape[1:]), dtype=x_T.dtype, device=x_T.device),
                      x0=torch.empty_like(x_T), graph=None)
        self.captures += 1
        if self.emulate:
            return c
        side = torch.cuda.Stream(device=x_T.device)
        side.wait_stream(torch.cuda.current_stream(x_T.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._body(c)
        torch.cuda.current_stream(x_T.device).wait_stream(side)
        torch.cuda.synchronize(x_T.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._body(c)
        c.graph = graph
        return c

    @torch.no_grad()
    def _replay(self, c: _Captured, x_T: Tensor, cond: Tensor, generator: torch.Generator | None):
        c.x_T.copy_(x_T)
        c.cond.copy_(cond)
        for j in range(self.schedule.num_steps):   # the eager loop's draws, in its order
            c.noise[j].copy_(torch.randn(x_T.shape, generator=generator, device=x_T.device, dtype=x_T.dtype))
        if c.graph is None:
            self._body(c)
        else:
            c.graph.replay()
        self.replays += 1
        if self.clone_outputs:
            return c.states.clone(), c.x0.clone(), None
        return c.states, c.x0, None
