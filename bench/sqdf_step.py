"""The SQDF training step, ours against a reference-style implementation (the authors' way), per stage, in time and
memory, on equal work.

    python bench/sqdf_step.py [--preset cpu-small|sd15|tiny] [--micro-batches 1,4,8] [--impls ours,reference]
                              [--repeat N] [--warmup N] [--attention sdpa|xformers] [--cap-gib G] [--no-count]
                              [--in-process] [--label TEXT] [--json PATH] [--results PATH | --no-append]
                              [--ours-args="--no-checkpoint-reward ..."]
    python bench/sqdf_step.py --check [--device cpu|cuda]     # equal work on the tiny networks, then exit

Two implementations of one SQDF micro-step (docs/method.md §4.1) on the same networks, inputs and settings:

    ours        the trainer's step as it runs: `sqdf_fast.train.train_step` on a run built as the trainer builds it
                (`train.Run`, `methods.build`, `train.make_optimizer`): one UNet with the trainable policy LoRA, the
                reference = adapters off, the consistency model = a frozen LCM-LoRA adapter on the same UNet run on
                the conditional branch only, the fused step/KL/loss ops, the consistency model, VAE decoder and reward
                gradient-checkpointed, the replay buffer in memory, the DDIM tables on the device.
    reference   `Reference` below, what the authors' code does (docs/method.md §9, their T2I `buffer_sqdf_pipeline_
                step_with_grad` and trainer): three UNets (the policy with its LoRA; a separate full reference UNet
                in float32; a consistency UNet with the LCM-LoRA fused in, run with classifier-free guidance on the
                doubled [uncond; cond] batch at guidance 1), the prompts encoded by the resident text encoder every
                micro-step, schedule values gathered through the host (`.cpu()` look-ups), torch.utils.checkpoint
                around the policy UNet call only (nothing on the consistency/decode/reward path), the replay buffer
                on disk (one torch.save per trajectory, torch.load of the metadata and of each sampled trajectory
                per micro-step), step, KL and loss in eager PyTorch, the rewards and KL copied to the host for
                logging. `reference-nockpt` is the same without any checkpointing: the authors' buffered step as
                their trainer calls it (it never passes gradient_checkpoint, whose default is False).

Equal work: both compute the same loss from the same (x_j, j, prompt, noise) with the same weights (the consistency
model at the action's own timestep t_{j+1}, as ours; the authors' nearest-LCM-timestep look-up and their reward
mask are left out since they change the computation, not its cost). `--check` and tests/test_bench_sqdf_step.py
compare the loss and the policy adapter's gradient on tiny networks (float32; tolerance in `CHECK_TOLERANCE`).

Networks (`--arch`, set by the preset), all random weights (nothing downloaded):
    sd15    `sd-random`'s: SD-1.5's UNet, VAE and CLIP ViT-L/14 text tower, a rank-64 LCM-LoRA on LCM-LoRA's modules,
            the aesthetic reward's CLIP ViT-L/14 image tower and LAION head
    small   the same layouts narrower (UNet 64-128-256-256 channels; VAE 32-64-128-128 with one resnet per level;
            CLIP text tower 256 wide, 2 layers; CLIP image tower 128 wide, 4 layers, at 224 px; LCM-LoRA rank 16),
            with FLOPs in about SD-1.5's proportions at 512 px (VAE decode 3.8x and the reward 0.3x one UNet
            forward; SD-1.5: 3.1x and 0.2x), at a size two CPU cores time in minutes. SD-1.5's own networks at 64
            px take tens of seconds per micro-step at micro-batch 8 on such a machine (the 224 px ViT-L reward
            alone 8 s forward), and the reference's three float32 UNets plus ours need 17 GB.
    tiny    the tests' tiny pipeline (sqdf_fast.tasks.sd_tiny) with a 1-layer 32-px CLIP reward
Presets: `cpu-small` (small, 128 px, 10 steps, float32, CPU), `sd15` (sd15, 512 px, 50 steps, bfloat16 frozen
weights, CUDA), `tiny` (the smoke test's). Both implementations take the sd task's defaults (guidance 5, alpha 2,
gamma 0.9, eta 1, LoRA rank 4 on attention, AdamW lr 1e-3 wd 1e-4, clip 1, buffer 256 trajectories in bfloat16 for
ours).

Measurement. Each implementation runs in its own worker process (`--in-process`: both in this one), so its peak
memory is its own; the parent alternates them step by step (interleaved, the first alternating) so that other
processes on the machine slow both alike, and reports medians. Per implementation: rollouts of
max(micro-batches) trajectories into the buffer (one warm-up, then timed: `rollout_s_per_traj` and its stages), then
per micro-batch --warmup steps, one counting step (not timed: FLOPs and bytes per stage under a dispatch mode, and
the bytes saved for backward), --repeat timed steps. A step is one optimizer step of one micro-batch (grad_accum 1):
buffer sample, forward, backward, clip, AdamW; `samples_per_s` = micro-batch / median step time;
`samples_per_s_with_rollout` charges each trained sample one trajectory (the sd defaults: rollout_batch =
batch_size, replay_ratio 1).

Stages (seconds per step, forward and backward together; a checkpointed region's recomputation is part of its
stage's backward): buffer_sample, prompt_encode, policy (policy UNet forward and backward), reference (reference UNet
forward), consistency, decode, reward, loss (step, KL, loss and the glue between), optimizer (zero_grad, clip,
AdamW and ours' non-finite guard). The split comes from switch points at the stage wrappers and from gradient hooks
on each stage's output; on CUDA each switch records an event and the step synchronises once at its end.

Memory. `peak_mib`: on CUDA `torch.cuda.max_memory_allocated` of the implementation's process over its timed steps;
on the CPU the accounted peak: parameters and buffers held (each storage once), the in-memory replay buffer, the
trainable state (LoRA, gradients, AdamW) and the bytes saved for backward by the forward
(sqdf_fast.memory's mechanism: a checkpointed region's recomputation adds that region's activations for a moment,
which this leaves out). `peak_rss_mib` is the process's peak resident memory, `rss_base_mib` its resident memory
after the imports, before building anything.

How far from the limit: `flops` and `gemm_bytes` per stage (matrix products, convolutions and attention, forward
and backward, recomputation included), and `bound_s`, the sum over those ops of max(flops / dense rate, bytes /
copy bandwidth) at this machine's measured rates, everything else assumed fused away: a lower bound on the stage's
time. The dense rate `dense_tflops` is the higher of a measured matmul (`matmul_tflops`) and 3x3 convolution
(`conv_tflops`) in the weights' dtype (on this project's CPU the BLAS matmul reaches about two thirds of what
oneDNN's convolutions do), `copy_gbps` the copy bandwidth; both are measured before and after the run and the
higher values kept. `efficiency` = bound_s / measured seconds.

`--cap-gib G`: afterwards, the largest micro-batch of a ladder whose step fits in G GiB, per implementation (CUDA:
torch.cuda.set_per_process_memory_fraction, an out-of-memory error ends the ladder; CPU: the accounted peak).

Rows (one per implementation and micro-batch, with device name, versions, command, label and a shared run_id) are
appended to bench/results/sqdf_step.jsonl unless --no-append, and written as a JSON list to --json PATH.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import random
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from diffusers import AutoencoderKL, DDIMScheduler, LCMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig  # noqa: E402

from sqdf_fast import config, methods, ops, train  # noqa: E402
from sqdf_fast.adapters import POLICY, adapter_state_dict, add_policy_lora, load_adapter_state_dict  # noqa: E402
from sqdf_fast.distributed import Context  # noqa: E402
from sqdf_fast.info import device_name, version  # noqa: E402
from sqdf_fast.memory import parameter_bytes  # noqa: E402
from sqdf_fast.schedule import DDIMSchedule  # noqa: E402
from sqdf_fast.tasks.sd import (  # noqa: E402
    CLIP_L14_TEXT_CONFIG,
    CLIP_L14_VISION_CONFIG,
    SD15_UNET_CONFIG,
    SD_VAE_CONFIG,
    Pipeline,
    build_task,
    load_prompts,
    random_lora_state_dict,
    random_pipeline,
)
from sqdf_fast.tasks.sd.lcm import LCM_LORA_TARGETS, load_lcm_lora  # noqa: E402
from sqdf_fast.tasks.sd.pipeline import RANDOM_WEIGHTS_SEED  # noqa: E402
from sqdf_fast.tasks.sd.prompts import encode_prompts  # noqa: E402
from sqdf_fast.tasks.sd.task import LORA_TARGETS, random_aesthetic_reward  # noqa: E402

RESULTS = BENCH / "results" / "sqdf_step.jsonl"
IMPLS = ("ours", "reference", "reference-nockpt")
STAGES = ("buffer_sample", "prompt_encode", "policy", "reference", "consistency", "decode", "reward", "loss",
          "optimizer")
MIB = 2**20
# equal work: |loss_ours - loss_ref| <= rtol |loss_ref| and max |grad_ours - grad_ref| <= rtol max |grad_ref|
CHECK_TOLERANCE = {"loss_rtol": 1e-5, "grad_rtol": 1e-4}

PRESETS = {
    "tiny": dict(arch="tiny", device="cpu", resolution=64, sample_steps=3, micro_batches="1,2", guidance=2.0,
                 weights_dtype="float32", repeat=1, warmup=1),
    "cpu-small": dict(arch="small", device="cpu", resolution=128, sample_steps=10, micro_batches="1,4,8",
                      guidance=5.0, weights_dtype="float32", repeat=5, warmup=1, threads=1),
    "sd15": dict(arch="sd15", device="cuda", resolution=512, sample_steps=50, micro_batches="1,4,8", guidance=5.0,
                 weights_dtype="bfloat16", repeat=3, warmup=1),
}

# ---- networks ------------------------------------------------------------------------------------------------------
SMALL_UNET_CONFIG = dict(SD15_UNET_CONFIG, block_out_channels=(64, 128, 256, 256), cross_attention_dim=256)
# narrower and (VAE) shallower so that the FLOPs keep SD-1.5's proportions at 512 px: VAE decode about 3x, CLIP
# image tower about 0.2x one UNet forward (SD-1.5: 2515, 803 and 162 GFLOP per image)
SMALL_VAE_CONFIG = dict(SD_VAE_CONFIG, block_out_channels=(32, 64, 128, 128), layers_per_block=1)
SMALL_TEXT_CONFIG = dict(CLIP_L14_TEXT_CONFIG, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, projection_dim=256)
SMALL_VISION_CONFIG = dict(CLIP_L14_VISION_CONFIG, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=4, projection_dim=128)
TINY_VISION_CONFIG = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                          patch_size=8, image_size=32, projection_dim=32, hidden_act="quick_gelu")
TINY_LCM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
# arch -> (vision tower config, LCM-LoRA targets, rank, scale)
ARCHS = {
    "sd15": (CLIP_L14_VISION_CONFIG, LCM_LORA_TARGETS, 64, 0.01),   # exactly sd-random's (make_random_task)
    "small": (SMALL_VISION_CONFIG, LCM_LORA_TARGETS, 16, 0.01),
    "tiny": (TINY_VISION_CONFIG, TINY_LCM_TARGETS, 4, 0.3),
}


def small_pipeline(dtype: torch.dtype) -> Pipeline:
    """SD-1.5's layouts, narrower (`--arch small`), seeded random weights as `random_pipeline`'s."""
    return random_pipeline(dtype, unet_config=SMALL_UNET_CONFIG, vae_config=SMALL_VAE_CONFIG,
                           text_config=SMALL_TEXT_CONFIG)


def build_networks(arch: str, dtype: torch.dtype) -> dict:
    """{"pipeline", "reward", "lcm_lora"} of `arch`, the same weights in every process."""
    if arch == "tiny":
        from sqdf_fast.tasks.sd_tiny import tiny_pipeline
        pipeline = tiny_pipeline(0, dtype)
    else:
        pipeline = random_pipeline(dtype) if arch == "sd15" else small_pipeline(dtype)
    vision, targets, rank, scale = ARCHS[arch]
    generator = torch.Generator().manual_seed(RANDOM_WEIGHTS_SEED + 1)
    lcm_lora = random_lora_state_dict(pipeline.unet, targets, rank, generator, scale=scale)
    reward = random_aesthetic_reward(CLIPVisionConfig(**vision), generator, dtype)
    return {"pipeline": pipeline, "reward": reward, "lcm_lora": lcm_lora}


def set_attention(modules: list[nn.Module], backend: str, device: torch.device) -> None:
    """sdpa: torch's scaled_dot_product_attention (diffusers' default); xformers: its memory-efficient attention in
    every diffusers model (UNets, VAE). xformers is optional and CUDA-only."""
    if backend == "sdpa":
        return
    if backend != "xformers":
        raise ValueError(f"attention={backend!r}: must be sdpa or xformers")
    try:
        import xformers  # noqa: F401
    except ImportError as err:
        raise ValueError(f"attention=xformers: xformers is not importable ({err}); install it or use sdpa") from err
    if device.type != "cuda":
        raise ValueError(f"attention=xformers: xformers' attention runs on CUDA only, the device is {device}")
    for module in modules:
        module.enable_xformers_memory_efficient_attention()


# ---- timing: stages ------------------------------------------------------------------------------------------------
class StageClock:
    """Splits a step's wall time into named stages. `switch(stage)` ends the running interval (it belongs to the
    current stage, or to `ended`) and makes `stage` current; wrappers (`stage`) switch on entry and back on exit,
    gradient hooks (`on_grad`) switch when the backward pass reaches a stage's output. On CUDA a switch records an
    event, and `finish` synchronises once and reads the intervals off the device's timeline. `prefix` names a phase
    (rollouts: "rollout.")."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.cuda, self.enabled = device.type == "cuda", enabled
        self.prefix, self.current, self.marks, self.depth = "", None, [], 0
        self.op_stage = None   # the stage an OpCounter attributes ops to (the parameter hooks leave it)

    def _stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @property
    def running(self) -> bool:
        return self.enabled and self.current is not None

    def start(self, stage: str) -> None:
        if self.enabled:
            self.marks, self.current = [(self._stamp(), None)], stage
            self.op_stage = stage

    def switch(self, stage: str, ended: str | None = None) -> None:
        if self.running:
            self.marks.append((self._stamp(), self.prefix + (ended or self.current)))
            self.current = stage
            if ended is None:
                self.op_stage = stage

    def finish(self) -> dict[str, float]:
        """{stage: seconds, "total": seconds} of the step that `start` began."""
        if not self.running:
            return {}
        self.switch("done")
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = defaultdict(float)
        for (begin, _), (end, stage) in zip(self.marks, self.marks[1:]):
            totals[stage] += begin.elapsed_time(end) / 1e3 if self.cuda else end - begin
        totals["total"] = sum(totals.values())
        self.current, self.op_stage, self.marks = None, None, []
        return dict(totals)

    @contextlib.contextmanager
    def stage(self, name: str):
        """The block runs as stage `name`, then the previous stage resumes. Nested blocks, and blocks run by the
        backward pass (a checkpoint's recomputation), keep the outer stage."""
        if not self.running or self.depth or torch._C._current_graph_task_id() != -1:
            yield
            return
        previous, self.depth = self.current, self.depth + 1
        self.switch(name)
        try:
            yield
        finally:
            self.depth -= 1
            self.switch(previous)

    def wrap(self, fn, name: str, outputs=None, inputs=None):
        """fn run as stage `name`; gradient hooks switch the backward pass to `name` at the tensors `outputs(result)`
        returns and to "loss" at `inputs(args)` (the glue before them)."""
        def wrapped(*args, **kwargs):
            outer = not self.depth
            with self.stage(name):
                result = fn(*args, **kwargs)
            if outer and outputs is not None:
                for t in outputs(result):
                    self.on_grad(t, name)
            if outer and inputs is not None:
                for t in inputs(args):
                    self.on_grad(t, "loss")
            return result
        return wrapped

    def on_grad(self, tensor: Tensor | None, stage: str) -> None:
        """Once the gradient of `tensor` is complete the backward pass works on its producer: stage `stage`."""
        if self.running and isinstance(tensor, Tensor) and tensor.requires_grad:
            tensor.register_hook(lambda grad: self.switch(stage))

    def watch_parameters(self, params: list[Tensor]) -> None:
        """After each trainable parameter's gradient: the policy's backward up to here, the optimizer from here on
        (the last parameter to receive its gradient ends the backward pass)."""
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: self.switch("optimizer", ended="policy"))


def sdpa_cpu_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


class OpCounter(TorchDispatchMode):
    """FLOPs and bytes (read and written) of every matrix-class op (matmul, convolution, attention; torch's
    flop_counter formulas, plus the CPU flash attention), attributed to the clock's current stage: per stage, each
    distinct (flops, bytes) with its count, from which `roofline` gives the lower bound at any rates."""

    def __init__(self, clock: StageClock):
        super().__init__()
        from torch.utils.flop_counter import flop_registry
        aten = torch.ops.aten
        self.formulas = dict(flop_registry)
        self.formulas[aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_cpu_flops
        self.formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = sdpa_cpu_backward_flops
        self.clock = clock
        self.stages: dict[str, dict[tuple[float, float], int]] = defaultdict(lambda: defaultdict(int))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None and self.clock.op_stage is not None:
            flops = float(formula(*args, **kwargs, out_val=out))
            nbytes = float(sum(t.nbytes for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, Tensor)))
            self.stages[self.clock.prefix + self.clock.op_stage][flops, nbytes] += 1
        return out

    def ops(self) -> dict[str, list[list[float]]]:
        return {stage: [[f, b, n] for (f, b), n in ops.items()] for stage, ops in self.stages.items()}


def roofline(ops: list[list[float]], rates: dict) -> float:
    """Seconds at least: each op at max(flops / matmul rate, bytes / copy bandwidth), everything else fused away."""
    flops_per_s, bytes_per_s = rates["dense_tflops"] * 1e12, rates["copy_gbps"] * 1e9
    return sum(n * max(f / flops_per_s, b / bytes_per_s) for f, b, n in ops)


class SavedBytes:
    """The distinct storages autograd saves for backward inside `counting()` (parameters excluded: resident anyway);
    non-reentrant checkpoint regions save nothing here (sqdf_fast.memory.saved_tensor_bytes's mechanism)."""

    def __init__(self, resident: list[Tensor]):
        self.skip = {(str(t.device), t.untyped_storage().data_ptr()) for t in resident}
        self.seen: dict[tuple, int] = {}

    def pack(self, t: Tensor) -> Tensor:
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key not in self.skip and key[1] != 0:
            self.seen[key] = t.untyped_storage().nbytes()
        return t

    @contextlib.contextmanager
    def counting(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield

    def total(self) -> int:
        return sum(self.seen.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the configuration both implementations read -------------------------------------------------------------------
def make_config(spec: dict) -> config.TrainConfig:
    """The sd task's defaults, the spec's sizes, a buffer that holds the rollouts, rollouts only when asked
    (replay_ratio out of reach), then the --ours-args overrides."""
    values = dict(task="sd", resolution=spec["resolution"], sample_steps=spec["sample_steps"],
                  guidance=spec["guidance"], device=spec["device"], weights_dtype=spec["weights_dtype"],
                  batch_size=spec["rollout_batch"], rollout_batch=spec["rollout_batch"], replay_ratio=10**9,
                  progress=False, eval_per_class=2, prompts="simple-animals")
    if spec.get("ours_args"):
        values.update(vars(config.build_parser().parse_args(shlex.split(spec["ours_args"]))))
    return config.from_dict(values, "sqdf_step")


def trainable_state_bytes(params: list[Tensor], optimizer: torch.optim.Optimizer) -> int:
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
    grads = [p for p in params] * 2   # the parameters and their gradients (same size)
    return sum(t.numel() * t.element_size() for t in grads + state)


# ---- ours ----------------------------------------------------------------------------------------------------------
class Ours:
    """The trainer's SQDF step: `train.train_step` on a `train.Run` built as `train.build_run` builds one (without
    its base-model evaluation). Stage wrappers are instance attributes on the method and the task; nothing of the
    trainer is changed."""

    name = "ours"

    def __init__(self, cfg: config.TrainConfig, nets: dict, device: torch.device, clock: StageClock,
                 attention: str = "sdpa"):
        self.cfg, self.device, self.clock = cfg, device, clock
        task = build_task(f"sd-{cfg.resolution}px", cfg, nets["pipeline"], nets["reward"], nets["lcm_lora"])
        task.to(device)
        set_attention([task.unet, *[m for m in task.frozen if isinstance(m, AutoencoderKL)]], attention, device)
        params = add_policy_lora(task.unet, task.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
        schedule = DDIMSchedule.build(task.scheduler_config, cfg.sample_steps, device)
        method = methods.build(task, schedule, cfg)
        self.out = Path(tempfile.mkdtemp(prefix="sqdf_step_ours_"))
        self.run = train.Run(cfg=cfg, ctx=Context(device=device), out=self.out, task=task, schedule=schedule,
                             method=method, params=params, optimizer=train.make_optimizer(params, cfg, device),
                             generator=torch.Generator(device).manual_seed(train.rank_seed(cfg.seed, 0)),
                             guard=train.Guard(device, cfg.max_nonfinite_steps, verbose=False), start=time.time())
        self.modules = [task.unet, *task.frozen]
        self.saved: SavedBytes | None = None
        self._instrument()

    def _instrument(self) -> None:
        clock, method, task = self.clock, self.run.method, self.run.task
        method.draw = clock.wrap(method.draw, "buffer_sample")
        method.policy_eps = clock.wrap(method.policy_eps, "policy", outputs=lambda e: (e.cond, e.uncond))
        method.reference_eps = clock.wrap(method.reference_eps, "reference")
        method.x0_estimate = clock.wrap(method.x0_estimate, "consistency", outputs=lambda x0: (x0,),
                                        inputs=lambda args: (args[0],))
        task.decode = clock.wrap(task.decode, "decode", outputs=lambda images: (images,))
        task.reward = clock.wrap(task.reward, "reward", outputs=lambda reward: (reward,))
        micro_loss = method.micro_loss

        def counted_micro_loss(*args):
            with self.saved.counting() if self.saved is not None else contextlib.nullcontext():
                loss, stats = micro_loss(*args)
            clock.on_grad(loss, "loss")
            return loss, stats
        method.micro_loss = counted_micro_loss
        clock.watch_parameters(self.run.params)

    @property
    def params(self) -> list[Tensor]:
        return self.run.params

    def resident_bytes(self) -> dict:
        buffer = self.run.method.buffer
        return {"param_bytes": parameter_bytes(self.modules), "buffer_bytes": buffer.nbytes if buffer else 0,
                "trainable_bytes": trainable_state_bytes(self.params, self.run.optimizer)}

    def rollout(self, n: int) -> None:
        """n trajectories of the current policy into the buffer (method.prepare at a step where one is due)."""
        self.run.method.rollout_size = n
        self.run.method.prepare(0, self.run.generator)

    def step(self, micro_batch: int) -> None:
        """One optimizer step of one micro-batch, the trainer's own `train_step`."""
        run = self.run
        run.method.micro_size = micro_batch   # batch_size / grad_accum, fixed at build in the trainer
        run.step = max(run.step, 1)           # no rollout is due: those are measured apart
        train.train_step(run)
        run.window.clear()

    def fill_buffer(self, n: int) -> None:
        """At least n trajectories in the buffer, repeating the stored ones (the content does not change a step's
        cost)."""
        buffer = self.run.method.buffer
        while buffer.size < min(n, buffer.capacity):
            take = min(buffer.size, n - buffer.size)
            buffer.add(buffer.states[:take].clone(), buffer.cond[:take].clone(), buffer.reward[:take].clone())

    def zero_grad(self) -> None:
        self.run.optimizer.zero_grad(set_to_none=False)

    def close(self) -> None:
        import shutil
        shutil.rmtree(self.out, ignore_errors=True)


# ---- reference-style -----------------------------------------------------------------------------------------------
def left_broadcast(t: Tensor, shape: torch.Size) -> Tensor:
    """trl's _left_broadcast: (B,) -> (B, 1, ..., 1) broadcast to shape."""
    return t.reshape(list(t.shape) + [1] * (len(shape) - t.dim())).broadcast_to(shape)


class Reference:
    """The SQDF step the way the authors' code does it (module docstring), on the same networks and settings."""

    def __init__(self, cfg: config.TrainConfig, nets: dict, device: torch.device, clock: StageClock,
                 attention: str = "sdpa", checkpoint_unet: bool = True, buffer_dir: str | None = None):
        self.cfg, self.device, self.clock, self.checkpoint_unet = cfg, device, clock, checkpoint_unet
        self.name = "reference" if checkpoint_unet else "reference-nockpt"
        pipeline = nets["pipeline"]
        self.dtype = next(pipeline.unet.parameters()).dtype
        # three UNets: a full float32 reference copy, a consistency copy with the LCM-LoRA fused in, the policy
        self.ref_unet = copy.deepcopy(pipeline.unet)
        if self.dtype != torch.float32:
            self.ref_unet.to(torch.float32)
        self.cm_unet = copy.deepcopy(pipeline.unet)
        load_lcm_lora(self.cm_unet, nets["lcm_lora"], self.dtype)
        self.cm_unet.fuse_lora(adapter_names=["lcm"])
        self.cm_unet.unload_lora()
        self.unet = pipeline.unet
        self.params = add_policy_lora(self.unet, LORA_TARGETS, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
        self.vae, self.text_encoder, self.tokenizer = pipeline.vae, pipeline.text_encoder, pipeline.tokenizer
        self.reward_model = nets["reward"].requires_grad_(False).eval()
        self.modules = [self.unet, self.ref_unet, self.cm_unet, self.vae, self.text_encoder, self.reward_model]
        for module in self.modules:
            module.to(device)
        set_attention([self.unet, self.ref_unet, self.cm_unet, self.vae], attention, device)
        self.image_processor = VaeImageProcessor(vae_scale_factor=2 ** (len(self.vae.config.block_out_channels) - 1))
        self.scheduler = DDIMScheduler.from_config(pipeline.scheduler_config)
        self.scheduler.set_timesteps(cfg.sample_steps, device=device)
        self.lcm_scheduler = LCMScheduler.from_config(pipeline.scheduler_config)
        self.num_steps, self.guidance = cfg.sample_steps, cfg.guidance
        train_prompts, eval_prompts = load_prompts(cfg.prompts)
        self.prompts = list(dict.fromkeys(train_prompts + eval_prompts)) + [""]   # the task's prompt-table order
        self.train_rows = [self.prompts.index(p) for p in train_prompts]
        self.neg_embeds = encode_prompts(self.text_encoder, self.tokenizer, [""])   # once, as the authors
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_shape = (self.unet.config.in_channels, cfg.resolution // factor, cfg.resolution // factor)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.buffer_dir = Path(buffer_dir or tempfile.mkdtemp(prefix="sqdf_step_buffer_"))
        self.buffer_dir.mkdir(parents=True, exist_ok=True)
        self.meta_path, self.stored = self.buffer_dir / "metadata.pt", 0
        self.capacity = cfg.buffer_size
        self.generator = torch.Generator(device).manual_seed(train.rank_seed(cfg.seed, 0))
        self.rng = random.Random(cfg.seed)   # the authors sample the buffer with python's random.sample
        self.saved: SavedBytes | None = None
        clock.watch_parameters(self.params)

    def resident_bytes(self) -> dict:
        disk = sum(p.stat().st_size for p in self.buffer_dir.glob("*.pt"))
        return {"param_bytes": parameter_bytes(self.modules), "buffer_bytes": 0, "buffer_disk_bytes": disk,
                "trainable_bytes": trainable_state_bytes(self.params, self.optimizer)}

    # the pieces ---------------------------------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> Tensor:
        return encode_prompts(self.text_encoder, self.tokenizer, prompts)

    def _policy(self, latent_in: Tensor, t_in: Tensor, context: Tensor) -> Tensor:
        return self.unet(latent_in.to(self.dtype), t_in, encoder_hidden_states=context).sample.float()

    def host_step(self, eps: Tensor, t: Tensor, x: Tensor, noise: Tensor,
                  ref_eps: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The authors' sqdf_scheduler_step: alphas and the variance gathered on the host (`.cpu()`), eager maths;
        returns (x_prev, KL term or None)."""
        scheduler, eta = self.scheduler, self.cfg.eta
        prev_t = (t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps).clamp(
            0, scheduler.config.num_train_timesteps - 1)
        alphas = scheduler.alphas_cumprod
        a = alphas.gather(0, t.cpu())
        a_prev = torch.where(prev_t.cpu() >= 0, alphas.gather(0, prev_t.cpu()), scheduler.final_alpha_cumprod)
        variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        a, a_prev = left_broadcast(a, x.shape).to(x.device), left_broadcast(a_prev, x.shape).to(x.device)
        std = eta * left_broadcast(variance, x.shape).to(x.device) ** 0.5
        beta = 1 - a
        x0 = (x - beta ** 0.5 * eps) / a ** 0.5
        mu = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        x_prev = mu + std * noise
        if ref_eps is None:
            return x_prev, None
        ref_x0 = (x - beta ** 0.5 * ref_eps) / a ** 0.5
        mu_ref = a_prev ** 0.5 * ref_x0 + (1 - a_prev - std ** 2) ** 0.5 * ref_eps
        scalar = 1 / (std.reshape(std.shape[0], -1).mean(dim=1) ** 2)
        kl = scalar * (mu_ref - mu).square().reshape(x.shape[0], -1).mean(dim=1)
        return x_prev, kl

    def lcm_x0(self, eps: Tensor, t: Tensor, sample: Tensor) -> Tensor:
        """The authors' lcm_scheduler_step_from_xt_to_x0."""
        alphas = self.lcm_scheduler.alphas_cumprod.to(sample.device)
        a = left_broadcast(alphas[t], sample.shape)
        c_skip, c_out = self.lcm_scheduler.get_scalings_for_boundary_condition_discrete(t)
        c_skip, c_out = left_broadcast(c_skip, sample.shape), left_broadcast(c_out, sample.shape)
        x0 = (sample - (1 - a).sqrt() * eps) / a.sqrt()
        return c_out * x0 + c_skip * sample

    def decode(self, x0: Tensor) -> Tensor:
        images = self.vae.decode(x0.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return self.image_processor.postprocess(images, output_type="pt", do_denormalize=[True] * images.shape[0])

    # the loss -----------------------------------------------------------------------------------------------------
    def loss(self, x: Tensor, j: Tensor, context: Tensor, cond: Tensor, generator: torch.Generator) -> Tensor:
        """The SQDF loss of states x (B, C, H, W) at transitions j (B,) with prompt embeddings `context` (B, L, D),
        as the authors' buffered step computes it (without their reward mask)."""
        clock, B = self.clock, x.shape[0]
        doubled = self.guidance != 1.0
        t = self.scheduler.timesteps[j]
        latent_in = torch.cat([x, x]) if doubled else x
        t_in = torch.cat([t, t]) if doubled else t
        ctx = torch.cat([self.neg_embeds.expand(B, -1, -1), context]) if doubled else context
        with clock.stage("policy"):
            if self.checkpoint_unet and torch.is_grad_enabled():
                eps = checkpoint(self._policy, latent_in, t_in, ctx, use_reentrant=False)
            else:
                eps = self._policy(latent_in, t_in, ctx)
        clock.on_grad(eps, "policy")
        with clock.stage("reference"):
            ref = self.ref_unet(latent_in.float(), t_in, encoder_hidden_states=ctx.float()).sample.float()
        if doubled:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + self.guidance * (eps_c - eps_u)
            ref_u, ref_c = ref.chunk(2)
            ref = ref_u + self.guidance * (ref_c - ref_u)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        action, kl = self.host_step(eps, t, x, noise, ref)
        clock.on_grad(action, "loss")
        with clock.stage("consistency"):
            t_next = (t - self.scheduler.config.num_train_timesteps // self.num_steps).clamp(min=0)
            cm_in = torch.cat([action, action]) if doubled else action
            cm_t = torch.cat([t_next, t_next]) if doubled else t_next
            pred = self.cm_unet(cm_in.to(self.dtype), cm_t, encoder_hidden_states=ctx).sample.float()
            if doubled:   # classifier-free guidance at guidance 1 on the doubled batch
                pred_u, pred_c = pred.chunk(2)
                pred = pred_u + 1.0 * (pred_c - pred_u)
            x0_hat = self.lcm_x0(pred, t_next, action)
            last = (j == self.num_steps - 1).view(-1, 1, 1, 1)
            x0 = torch.where(last, action, x0_hat)
        clock.on_grad(x0, "consistency")
        with clock.stage("decode"):
            images = self.decode(x0)
        clock.on_grad(images, "decode")
        with clock.stage("reward"):
            reward = self.reward_model(images, cond).float()
        clock.on_grad(reward, "reward")
        k = self.num_steps - 1 - j
        loss = (-((self.cfg.gamma ** k) * reward - self.cfg.alpha * kl)).mean()
        clock.on_grad(loss, "loss")
        return loss, reward, kl

    # rollouts and the disk buffer -----------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, n: int) -> None:
        """n trajectories of the policy (doubled batch, host-gathered DDIM step), decoded and scored, each saved to
        its own file, and the metadata file rewritten."""
        clock, device = self.clock, self.device
        rows = [self.rng.choice(self.train_rows) for _ in range(n)]
        prompts = [self.prompts[r] for r in rows]
        with clock.stage("prompt_encode"):
            context = self.encode(prompts)
        doubled = self.guidance != 1.0
        ctx = torch.cat([self.neg_embeds.expand(n, -1, -1), context]) if doubled else context
        x = torch.randn((n, *self.latent_shape), generator=self.generator, device=device)
        states = []
        for t in self.scheduler.timesteps:
            states.append(x)
            t_b = t.expand(n)
            latent_in, t_in = (torch.cat([x, x]), torch.cat([t_b, t_b])) if doubled else (x, t_b)
            eps = self._policy(latent_in, t_in, ctx)
            if doubled:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + self.guidance * (eps_c - eps_u)
            noise = torch.randn(x.shape, generator=self.generator, device=device, dtype=x.dtype)
            x, _ = self.host_step(eps, t_b, x, noise)
        with clock.stage("decode"):
            images = self.decode(x)
        with clock.stage("reward"):
            rewards = self.reward_model(images, torch.tensor(rows, device=device)).float().tolist()
        with clock.stage("store"):
            all_latents = torch.stack(states, dim=1).to(self.dtype)   # (n, T, C, H, W)
            meta = torch.load(self.meta_path) if self.meta_path.exists() else []
            for i in range(n):
                slot = self.stored % self.capacity
                name = f"traj_{slot:06d}.pt"
                torch.save({"latents": all_latents[i].detach().contiguous().clone().cpu(), "prompts": prompts[i],
                            "cond": rows[i], "rewards": rewards[i]}, self.buffer_dir / name)
                entry = {"file_name": name, "reward": rewards[i], "prompt": prompts[i]}
                if len(meta) < self.capacity:
                    meta.append(entry)
                else:
                    meta[slot] = entry
                self.stored += 1
            torch.save(meta, self.meta_path)

    def fill_buffer(self, n: int) -> None:
        meta = torch.load(self.meta_path)
        while len(meta) < min(n, self.capacity):
            meta.append(dict(meta[len(meta) % max(self.stored, 1)]))
        torch.save(meta, self.meta_path)

    def step(self, micro_batch: int) -> None:
        """One optimizer step of one micro-batch drawn from the disk buffer."""
        clock, device = self.clock, self.device
        clock.switch("buffer_sample")
        meta = torch.load(self.meta_path)
        picked = self.rng.sample(meta, micro_batch)
        loaded = [torch.load(self.buffer_dir / m["file_name"], map_location=device) for m in picked]
        all_latents = torch.stack([d["latents"] for d in loaded])
        cond = torch.tensor([d["cond"] for d in loaded], device=device)
        j = torch.randint(0, self.num_steps, (micro_batch,), generator=self.generator, device=device)
        x = all_latents[torch.arange(micro_batch, device=device), j].float()
        clock.switch("prompt_encode")
        context = self.encode([d["prompts"] for d in loaded])
        clock.switch("loss")
        with self.saved.counting() if self.saved is not None else contextlib.nullcontext():
            loss, reward, kl = self.loss(x, j, context, cond, self.generator)
        reward.detach().cpu().numpy(), kl.detach().cpu().numpy()   # gathered to the host for logging, as theirs
        loss.backward()
        clock.switch("optimizer")
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad()
        loss.item()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def close(self) -> None:
        import shutil
        shutil.rmtree(self.buffer_dir, ignore_errors=True)


# ---- the FLOP model: every pass of every network, counted on the meta device ---------------------------------------
def pass_flops(arch: str, resolution: int, lora_rank: int = 4) -> dict[str, float]:
    """FLOPs of one row (image, prompt) through each network of `arch` at `resolution`, forward (`*_fwd`) and
    backward to its input with its weights frozen (`*_bwd`), counted by torch's FlopCounterMode on the meta device
    (no memory, no time): the base UNet, with the policy LoRA, with the LCM-LoRA; VAE decode; reward image tower;
    text encoder."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, inject_adapter_in_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionModelWithProjection

    from sqdf_fast.tasks.sd_tiny import TINY_TEXT_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG
    unet_config, vae_config, text_config = {"sd15": (SD15_UNET_CONFIG, SD_VAE_CONFIG, CLIP_L14_TEXT_CONFIG),
                                            "small": (SMALL_UNET_CONFIG, SMALL_VAE_CONFIG, SMALL_TEXT_CONFIG),
                                            "tiny": (TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_CONFIG)}[arch]
    vision, lcm_targets, lcm_rank, _ = ARCHS[arch]

    def count(fn) -> float:
        with FlopCounterMode(display=False) as mode:
            fn()
        return float(mode.get_total_flops())

    def forward_backward(module: nn.Module, run, x: Tensor, prefix: str, out: dict) -> None:
        module.requires_grad_(False)
        out[prefix + "_fwd"] = count(lambda: run(x))
        y = run(x)
        out[prefix + "_bwd"] = count(lambda: y.sum().backward())

    out: dict[str, float] = {}
    latent = resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)
    z = torch.empty(1, 4, latent, latent, device="meta", requires_grad=True)
    context = torch.empty(1, min(77, text_config["max_position_embeddings"]), unet_config["cross_attention_dim"],
                          device="meta")
    t = torch.tensor([500], device="meta")
    with warnings_off():
        for name, targets, rank in (("unet", None, 0), ("unet_policy", LORA_TARGETS, lora_rank),
                                    ("unet_lcm", lcm_targets, lcm_rank)):
            with init_empty_weights():
                unet = UNet2DConditionModel(**unet_config)
            if targets:
                inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                                   init_lora_weights=False), unet)
            forward_backward(unet, lambda x: unet(x, t, encoder_hidden_states=context).sample, z, name, out)
        with init_empty_weights():
            vae = AutoencoderKL(**vae_config)
            tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
            text = CLIPTextModel(CLIPTextConfig(**text_config))
        forward_backward(vae, lambda x: vae.decode(x).sample, z, "decode", out)
        size = vision["image_size"]
        images = torch.empty(1, 3, size, size, device="meta", requires_grad=True)
        forward_backward(tower, lambda x: tower(pixel_values=x).image_embeds, images, "reward", out)
        length = min(77, text_config["max_position_embeddings"])
        out["text_fwd"] = count(lambda: text(torch.zeros(1, length, dtype=torch.long, device="meta")))
    return out


@contextlib.contextmanager
def warnings_off():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def model_flops(passes: dict[str, float], guidance: float, ours_checkpoint: tuple[bool, bool, bool] = (True,) * 3,
                reference_checkpoint_unet: bool = True) -> dict[str, dict[str, float]]:
    """FLOPs per trained sample by stage, from the passes each implementation makes: ours (the policy and the
    reference on the doubled batch when guidance != 1; the consistency model, decoder and reward each recomputed in
    the backward pass when checkpointed: `ours_checkpoint`) and the reference-style step (its policy UNet
    recomputed when checkpointed; the consistency UNet on the doubled batch; the prompt encoded)."""
    p, rows = passes, (2 if guidance != 1.0 else 1)
    estimator, decoder, reward = (2 if on else 1 for on in ours_checkpoint)
    ours = {"policy": rows * (p["unet_policy_fwd"] + p["unet_policy_bwd"]), "reference": rows * p["unet_fwd"],
            "consistency": estimator * p["unet_lcm_fwd"] + p["unet_lcm_bwd"],
            "decode": decoder * p["decode_fwd"] + p["decode_bwd"], "reward": reward * p["reward_fwd"] + p["reward_bwd"]}
    policy_passes = 2 if reference_checkpoint_unet else 1
    reference = {"prompt_encode": p["text_fwd"],
                 "policy": rows * (policy_passes * p["unet_policy_fwd"] + p["unet_policy_bwd"]),
                 "reference": rows * p["unet_fwd"], "consistency": rows * (p["unet_fwd"] + p["unet_bwd"]),
                 "decode": p["decode_fwd"] + p["decode_bwd"], "reward": p["reward_fwd"] + p["reward_bwd"]}
    return {"ours": ours, "reference": reference}


# ---- equal work --------------------------------------------------------------------------------------------------
def equal_work(device: str = "cpu", arch: str = "tiny", batch: int = 3, seed: int = 0) -> dict:
    """Ours' loss and policy-adapter gradient against the reference-style ones on the same states, steps, prompts,
    noise and weights (float32, the `tiny` preset's networks, a perturbed policy LoRA so that every gradient is
    non-zero, guidance 2 so that the doubled batches run, rows at the first, a middle and the last transition)."""
    dev = torch.device(device)
    if dev.type == "cuda":   # TF32 would round each implementation's differently batched products differently
        with tf32_off():
            return equal_work_on(dev, arch, batch, seed)
    return equal_work_on(dev, arch, batch, seed)


@contextlib.contextmanager
def tf32_off():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def equal_work_on(dev: torch.device, arch: str, batch: int, seed: int) -> dict:
    device = str(dev)
    spec = dict(PRESETS["tiny"], rollout_batch=batch, device=device)
    cfg = make_config(spec)
    clock = StageClock(dev, enabled=False)
    nets = build_networks(arch, torch.float32)
    twin = copy.deepcopy(nets)
    ours = Ours(cfg, nets, dev, clock)
    ref = Reference(cfg, twin, dev, clock)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ours.params:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    load_adapter_state_dict(ref.unet, adapter_state_dict(ours.run.task.unet))
    x = torch.randn((batch, *ref.latent_shape), generator=generator).to(dev)
    steps = cfg.sample_steps
    j = torch.tensor([0, steps // 2, steps - 1] * batch)[:batch].to(dev)
    cond = torch.tensor(ref.train_rows[:batch], device=dev)
    method = ours.run.method
    loss_ours, _ = method.loss(x, j, cond, None, torch.Generator(dev).manual_seed(seed))
    loss_ours.backward()
    loss_ref, _, _ = ref.loss(x, j, ref.encode([ref.prompts[int(c)] for c in cond]), cond,
                              torch.Generator(dev).manual_seed(seed))
    loss_ref.backward()
    grads_ours = {n: p.grad for n, p in ours.run.task.unet.named_parameters() if f".{POLICY}." in n}
    grads_ref = {n: p.grad for n, p in ref.unet.named_parameters() if f".{POLICY}." in n}
    assert grads_ours.keys() == grads_ref.keys() and grads_ours, "the two policy adapters differ in layout"
    grad_scale = max(float(g.abs().max()) for g in grads_ref.values())
    grad_diff = max(float((grads_ours[n] - grads_ref[n]).abs().max()) for n in grads_ref)
    ours.close()
    ref.close()
    result = {"loss_ours": float(loss_ours.detach()), "loss_reference": float(loss_ref.detach()),
              "loss_abs_diff": abs(float(loss_ours.detach()) - float(loss_ref.detach())), "grad_max_abs": grad_scale,
              "grad_max_abs_diff": grad_diff, "n_grads": len(grads_ref), "device": device, **CHECK_TOLERANCE}
    result["ok"] = (result["loss_abs_diff"] <= CHECK_TOLERANCE["loss_rtol"] * abs(result["loss_reference"])
                    and grad_diff <= CHECK_TOLERANCE["grad_rtol"] * grad_scale and grad_scale > 0)
    return result


# ---- one implementation, driven by commands ------------------------------------------------------------------------
def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def machine_rates(device: torch.device, dtype: torch.dtype, small: bool = False) -> dict:
    """This machine's rates in `dtype`: a square matmul and a 3x3 convolution (TFLOP/s, the fastest of 5 after a
    warm-up), `dense_tflops` the higher of the two (the rate the bounds use: on some CPUs the BLAS matmul runs well
    below what oneDNN's convolutions reach), and the copy bandwidth (GB/s, bytes read + written). `small`: smaller
    operands, for the smoke run."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else (384 if small else 1536)
    batch, channels, size = (32, 640, 64) if cuda else ((1, 32, 16) if small else (8, 128, 64))
    copy_bytes = 2**30 if cuda else (16 if small else 256) * MIB
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    conv = nn.Conv2d(channels, channels, 3, padding=1).to(device, dtype).requires_grad_(False)
    image = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    src = torch.empty(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)

    def fastest_s(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        return min(times)
    with torch.no_grad():
        matmul = 2 * n**3 / fastest_s(lambda: torch.mm(a, b)) / 1e12
        convolution = 2 * batch * size**2 * channels**2 * 9 / fastest_s(lambda: conv(image)) / 1e12
        copy = 2 * copy_bytes / fastest_s(lambda: dst.copy_(src)) / 1e9
    return {"matmul_tflops": matmul, "conv_tflops": convolution, "dense_tflops": max(matmul, convolution),
            "matmul_dtype": str(dtype).removeprefix("torch."), "copy_gbps": copy}


class Handler:
    """One implementation in one process: builds it, then answers commands (dicts) with dicts."""

    def __init__(self, impl: str, spec: dict):
        self.impl_name, self.spec = impl, spec
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        self.device = torch.device(spec["device"])
        self.rss_base = rss_mib()
        self.impl = None
        self.clock = StageClock(self.device)

    def build(self) -> dict:
        start = time.perf_counter()
        cfg = make_config(self.spec)
        nets = build_networks(self.spec["arch"], getattr(torch, self.spec["weights_dtype"]))
        if self.impl_name == "ours":
            self.impl = Ours(cfg, nets, self.device, self.clock, self.spec["attention"])
        else:
            self.impl = Reference(cfg, nets, self.device, self.clock, self.spec["attention"],
                                  checkpoint_unet=self.impl_name == "reference")
        del nets
        gc.collect()
        sync(self.device)
        return {"build_s": time.perf_counter() - start, "rss_base_mib": self.rss_base, "cfg": {
            k: getattr(cfg, k) for k in ("guidance", "alpha", "gamma", "eta", "lora_rank", "lr", "weight_decay",
                                         "buffer_size", "buffer_dtype", "checkpoint_estimator", "checkpoint_decoder",
                                         "checkpoint_reward", "cuda_graphs")}}

    def rollout(self, n: int) -> dict:
        clock = self.clock
        clock.prefix = "rollout."
        clock.start("sample")
        self.impl.rollout(n)
        stages = clock.finish()
        clock.prefix = ""
        return {"stages": stages}

    def step(self, micro_batch: int, count: bool = False) -> dict:
        clock, impl = self.clock, self.impl
        counter = saved = None
        if count:
            resident = [t for m in impl.modules for t in [*m.parameters(), *m.buffers()]]
            saved = impl.saved = SavedBytes(resident)
            counter = OpCounter(clock)
        clock.start("optimizer")
        with counter if counter is not None else contextlib.nullcontext():
            impl.step(micro_batch)
        stages = clock.finish()
        impl.saved = None
        out = {"stages": stages}
        if count:
            out["saved_bytes"] = saved.total()
            out["ops"] = counter.ops()
        return out

    def memory_reset(self) -> dict:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return {}

    def memory(self) -> dict:
        out = {"peak_rss_mib": peak_rss_mib(), "rss_mib": rss_mib(), **self.impl.resident_bytes()}
        if self.device.type == "cuda":
            sync(self.device)
            out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
        return out

    def fill_buffer(self, n: int) -> dict:
        self.impl.fill_buffer(n)
        return {}

    def max_batch(self, cap_gib: float, ladder: list[int], saved_per_sample: float | None = None) -> dict:
        """The largest micro-batch of `ladder` whose step fits in cap_gib GiB (CUDA: the allocator capped, an
        out-of-memory error ends the ladder; CPU: the accounted peak from the saved bytes per sample)."""
        cap = cap_gib * 2**30
        tried, best = [], 0
        self.impl.fill_buffer(max(ladder))
        cuda = self.device.type == "cuda"
        if cuda:
            sync(self.device)
            gc.collect()
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(cap / total, 1.0), self.device)
        try:
            for micro_batch in ladder:
                if cuda:
                    try:
                        torch.cuda.reset_peak_memory_stats(self.device)
                        self.impl.step(micro_batch)
                        sync(self.device)
                        peak = torch.cuda.max_memory_allocated(self.device)
                    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
                        if not isinstance(err, torch.cuda.OutOfMemoryError) and "out of memory" not in str(err):
                            raise
                        self.impl.zero_grad()
                        gc.collect()
                        torch.cuda.empty_cache()
                        tried.append({"micro_batch": micro_batch, "fits": False})
                        break
                else:
                    held = self.impl.resident_bytes()
                    peak = held["param_bytes"] + held["buffer_bytes"] + held["trainable_bytes"] + \
                        (saved_per_sample or 0) * micro_batch
                fits = peak <= cap
                tried.append({"micro_batch": micro_batch, "fits": fits, "peak_mib": peak / MIB})
                if not fits:
                    break
                best = micro_batch
        finally:
            if cuda:
                torch.cuda.set_per_process_memory_fraction(1.0, self.device)
        return {"max_micro_batch": best, "tried": tried}

    def handle(self, message: dict) -> dict:
        command = message.pop("cmd")
        if command == "exit":
            if self.impl is not None:
                self.impl.close()
            return {}
        return getattr(self, command)(**message)


def worker_main(impl: str, spec_json: str) -> None:
    """`--worker IMPL`: commands as JSON lines on stdin, answers as JSON lines on the original stdout (everything
    printed meanwhile goes to stderr)."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    handler = Handler(impl, json.loads(spec_json))
    if handler.device.type == "cpu":
        from sqdf_fast.memory import keep_freed_cpu_memory
        keep_freed_cpu_memory()   # the trainer's CPU allocator setting, for both implementations
    for line in iter(sys.stdin.readline, ""):
        message = json.loads(line)
        command = message.get("cmd")
        try:
            answer = {"ok": handler.handle(message)}
        except Exception:   # noqa: BLE001 -- every failure goes back to the parent, which raises it
            answer = {"error": traceback.format_exc()}
        protocol.write(json.dumps(answer) + "\n")
        if command == "exit":
            return


class Worker:
    """An implementation in its own process (`worker_main`)."""

    def __init__(self, impl: str, spec: dict):
        self.impl = impl
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--spec", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def send(self, message: dict) -> None:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.impl} worker died (exit code {self.process.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the {self.impl} worker failed:\n{answer['error']}")
        return answer["ok"]

    def __call__(self, message: dict) -> dict:
        self.send(message)
        return self.receive()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self({"cmd": "exit"})
            except RuntimeError:
                pass
            self.process.wait(timeout=60)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Local:
    """An implementation in this process (--in-process)."""

    def __init__(self, impl: str, spec: dict):
        self.impl, self.handler = impl, Handler(impl, spec)
        self.pending = None

    def send(self, message: dict) -> None:
        self.pending = self.handler.handle(dict(message))

    def receive(self) -> dict:
        return self.pending

    def __call__(self, message: dict) -> dict:
        self.send(message)
        return self.receive()

    def close(self) -> None:
        self.handler.handle({"cmd": "exit"})

    def kill(self) -> None:
        self.close()


# ---- the run -------------------------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    p.add_argument("--arch", choices=sorted(ARCHS))
    p.add_argument("--device")
    p.add_argument("--resolution", type=int)
    p.add_argument("--sample-steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--weights-dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--micro-batches", help="comma-separated micro-batch sizes")
    p.add_argument("--impls", default="ours,reference", help=f"comma-separated, of {', '.join(IMPLS)}")
    p.add_argument("--repeat", type=int, help="timed steps per implementation and micro-batch")
    p.add_argument("--warmup", type=int, help="untimed steps before them")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "xformers"))
    p.add_argument("--no-count", action="store_true", help="skip the counting step (FLOPs, bytes, saved bytes)")
    p.add_argument("--cap-gib", type=float, help="also find the largest micro-batch that fits in this many GiB")
    p.add_argument("--cap-ladder", default="1,2,4,6,8,12,16,24,32")
    p.add_argument("--in-process", action="store_true", help="both implementations in this process")
    p.add_argument("--threads", type=int, help="torch.set_num_threads(N) in each implementation's process (cpu-small: "
                   "1, since two OpenMP threads per process on a shared 2-core machine stall each other)")
    p.add_argument("--ours-args", default="",
                   help="train options for ours, e.g. --ours-args=\"--no-checkpoint-reward\"")
    p.add_argument("--label", default="")
    p.add_argument("--json", type=Path, help="write the rows as a JSON list here")
    p.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file the rows are appended to")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--check", action="store_true", help="run the equal-work check on the tiny networks and exit")
    p.add_argument("--model-flops", action="store_true",
                   help="print the FLOP model of the preset's step (meta device, seconds) and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available() and not args.model_flops:
        p.error(f"--preset {args.preset} / --device cuda: CUDA is not available here")
    return args


def versions() -> dict:
    return {"torch": torch.__version__, "diffusers": version("diffusers"), "transformers": version("transformers"),
            "peft": version("peft"), "triton": version("triton"), "cuda": torch.version.cuda,
            "python": platform.python_version()}


def median_stages(samples: list[dict]) -> dict:
    keys = sorted({k for s in samples for k in s})
    return {k: statistics.median(s.get(k, 0.0) for s in samples) for k in keys}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    if args.worker:
        worker_main(args.worker, args.spec)
        return []
    if args.check:
        result = equal_work(args.device)
        print(json.dumps(result, indent=1))
        if not result["ok"]:
            raise SystemExit("equal-work check failed")
        return [result]
    if args.model_flops:
        model = model_flops(pass_flops(args.arch, args.resolution), args.guidance)
        print_model(model, args)
        return [model]
    impls = [i for i in args.impls.split(",") if i]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise SystemExit(f"--impls: unknown {sorted(unknown)}; choose from {', '.join(IMPLS)}")
    micro_batches = [int(b) for b in args.micro_batches.split(",")]
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)   # this process measures the machine's rates as the workers run
    if args.attention == "xformers":
        try:
            set_attention([], "xformers", device)   # the clear error, before any worker starts
        except ValueError as err:
            raise SystemExit(f"--{err}") from None
    spec = dict(arch=args.arch, device=args.device, resolution=args.resolution, sample_steps=args.sample_steps,
                guidance=args.guidance, weights_dtype=args.weights_dtype, rollout_batch=max(micro_batches),
                attention=args.attention, ours_args=args.ours_args, threads=args.threads)
    command = "python bench/sqdf_step.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    run_id, stamp = uuid.uuid4().hex[:12], time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(f"sqdf_step: preset {args.preset} ({args.arch}, {args.resolution} px, {args.sample_steps} steps, guidance "
          f"{args.guidance}, {args.weights_dtype}) on {device_name(device)}; {', '.join(impls)}; micro-batches "
          f"{micro_batches}; {'in process' if args.in_process else 'one process each'}", flush=True)
    start = time.perf_counter()
    runners = {impl: (Local if args.in_process else Worker)(impl, spec) for impl in impls}
    try:
        rows = measure(args, spec, runners, micro_batches, device)
    except BaseException:   # a failure or a caller's time box: busy workers are killed, not waited for
        for runner in runners.values():
            runner.kill()
        raise
    for runner in runners.values():
        runner.close()
    common = dict(bench="sqdf_step", preset=args.preset, arch=args.arch, resolution=args.resolution,
                  sample_steps=args.sample_steps, guidance=args.guidance, weights_dtype=args.weights_dtype,
                  attention=args.attention, device=device.type, device_name=device_name(device),
                  threads=args.threads or torch.get_num_threads(), op_backend=ops.backend_for(device)[0],
                  **versions(),
                  ours_args=args.ours_args, label=args.label, command=command, run_id=run_id, timestamp=stamp,
                  loadavg_1m=os.getloadavg()[0], wall_s=round(time.perf_counter() - start, 1))
    rows = [dict(common, **row) for row in rows]
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    if not args.no_append:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with args.results.open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


def measure(args, spec: dict, runners: dict, micro_batches: list[int], device: torch.device) -> list[dict]:
    impls = list(runners)

    def all_of(message: dict) -> dict:
        """The same command to every implementation at once (builds and rollouts overlap), answers by name."""
        for runner in runners.values():
            runner.send(dict(message))
        return {impl: runner.receive() for impl, runner in runners.items()}

    for runner in runners.values():   # the workers build while this process counts the FLOP model
        runner.send({"cmd": "build"})
    passes = pass_flops(args.arch, args.resolution)
    built = {impl: runner.receive() for impl, runner in runners.items()}
    models = {}
    for impl in impls:
        c = built[impl]["cfg"]
        model = model_flops(passes, args.guidance, (c["checkpoint_estimator"], c["checkpoint_decoder"],
                                                     c["checkpoint_reward"]), impl == "reference")
        models[impl] = model["ours" if impl == "ours" else "reference"]
    print("built: " + ", ".join(f"{i} {b['build_s']:.0f} s" for i, b in built.items()), flush=True)
    rates = machine_rates(device, getattr(torch, args.weights_dtype), small=args.arch == "tiny")
    print(f"machine: matmul {rates['matmul_tflops']:.3g}, convolution {rates['conv_tflops']:.3g} TFLOP/s "
          f"({rates['matmul_dtype']}), copy {rates['copy_gbps']:.0f} GB/s (measured again at the end; the higher "
          "rates set the bounds)", flush=True)
    n = max(micro_batches)
    rollouts = {impl: [] for impl in impls}
    for i in range(2):   # a warm-up rollout (it also fills the buffer), then a timed one; interleaved
        for impl in (impls if i % 2 == 0 else impls[::-1]):
            rollouts[impl].append(runners[impl]({"cmd": "rollout", "n": n})["stages"])
    rows = []
    for micro_batch in micro_batches:
        times = {impl: [] for impl in impls}
        counted = {}
        for i in range(args.warmup):
            for impl in (impls if i % 2 == 0 else impls[::-1]):
                runners[impl]({"cmd": "step", "micro_batch": micro_batch})
        if not args.no_count:
            for impl in impls:
                counted[impl] = runners[impl]({"cmd": "step", "micro_batch": micro_batch, "count": True})
        all_of({"cmd": "memory_reset"})
        for i in range(args.repeat):
            for impl in (impls if i % 2 == 0 else impls[::-1]):
                times[impl].append(runners[impl]({"cmd": "step", "micro_batch": micro_batch})["stages"])
        memory = all_of({"cmd": "memory"})
        for impl in impls:
            rows.append(make_row(impl, micro_batch, times[impl], counted.get(impl), memory[impl], rollouts[impl][-1],
                                 n, built[impl], rates, device))
            rows[-1]["model_flops_per_sample"] = models[impl]
            rows[-1]["model_flops_per_sample_total"] = sum(models[impl].values())
        line = " | ".join(f"{r['impl']} {r['samples_per_s']:.3g} samples/s, {r['peak_mib']:.0f} MiB"
                          for r in rows[-len(impls):])
        print(f"micro-batch {micro_batch}: {line}", flush=True)
    again = machine_rates(device, getattr(torch, args.weights_dtype), small=args.arch == "tiny")
    best = {k: max(rates[k], again[k]) for k in ("matmul_tflops", "conv_tflops", "dense_tflops", "copy_gbps")}
    for row in rows:
        add_bounds(row, best, [rates, again])
    if args.cap_gib:
        ladder = [int(b) for b in args.cap_ladder.split(",")]
        for impl in impls:
            per_sample = None
            if device.type == "cpu":
                mine = [r for r in rows if r["impl"] == impl and r.get("saved_bytes")]
                per_sample = max(r["saved_bytes"] / r["micro_batch"] for r in mine) if mine else 0.0
            found = runners[impl]({"cmd": "max_batch", "cap_gib": args.cap_gib, "ladder": ladder,
                                   "saved_per_sample": per_sample})
            for row in rows:
                if row["impl"] == impl:
                    row.update(cap_gib=args.cap_gib, max_micro_batch_under_cap=found["max_micro_batch"],
                               cap_tried=found["tried"])
            print(f"under {args.cap_gib:g} GiB: {impl} up to micro-batch {found['max_micro_batch']}", flush=True)
    return rows


def add_bounds(row: dict, best: dict, measured: list[dict]) -> None:
    """The lower bound per stage at the best of the rates measured before and after the run (a bound on time takes
    the machine's highest observed rates), and the measured time's distance from it."""
    row.update(best, rates_measured=measured)
    ops = row.pop("ops", None)
    if ops is None:
        return
    row["bound_s"] = {k: roofline(v, best) for k, v in ops.items()}
    row["efficiency"] = {k: v / row["stages"][k] for k, v in row["bound_s"].items() if row["stages"].get(k)}
    row["bound_s_total"] = sum(row["bound_s"].values())


def make_row(impl: str, micro_batch: int, samples: list[dict], counted: dict | None, memory: dict,
             rollout_stages: dict, rollout_n: int, built: dict, rates: dict, device: torch.device) -> dict:
    stages = median_stages(samples)
    step_s = stages.pop("total")
    stages.pop("done", None)
    rollout = {k.removeprefix("rollout."): v / rollout_n for k, v in rollout_stages.items()}
    rollout_total = rollout.pop("total")
    saved = counted["saved_bytes"] if counted else None
    held = memory["param_bytes"] + memory["buffer_bytes"] + memory["trainable_bytes"]
    if device.type == "cuda":
        peak, kind = memory["cuda_peak_bytes"], "cuda max_memory_allocated"
    else:
        peak, kind = held + (saved or 0), "accounted: parameters + buffer + trainable state + saved for backward"
    row = dict(impl=impl, micro_batch=micro_batch, samples_per_s=micro_batch / step_s, step_s=step_s,
               step_s_min=min(s["total"] for s in samples), repeat=len(samples),
               stages={k: stages.get(k, 0.0) for k in STAGES} | {k: v for k, v in stages.items() if k not in STAGES},
               rollout_s_per_traj=rollout_total, rollout_stages=rollout,
               samples_per_s_with_rollout=1.0 / (step_s / micro_batch + rollout_total),
               peak_mib=peak / MIB, peak_kind=kind, param_mib=memory["param_bytes"] / MIB,
               buffer_mib=memory["buffer_bytes"] / MIB, buffer_disk_mib=memory.get("buffer_disk_bytes", 0) / MIB,
               trainable_mib=memory["trainable_bytes"] / MIB, saved_mib=None if saved is None else saved / MIB,
               peak_rss_mib=memory["peak_rss_mib"], rss_base_mib=built["rss_base_mib"], build_s=built["build_s"],
               config=built["cfg"], **rates)
    if counted:
        row["ops"] = {k: v for k, v in counted["ops"].items() if not k.startswith("rollout.")}
        row["flops"] = {k: sum(f * n for f, _, n in v) for k, v in row["ops"].items()}
        row["gemm_bytes"] = {k: sum(b * n for _, b, n in v) for k, v in row["ops"].items()}
        row["flops_total"] = sum(row["flops"].values())
    return row


def print_model(model: dict, args) -> None:
    """The FLOP model as a table: TFLOP per trained sample by stage."""
    print(f"FLOPs per trained sample (TFLOP), {args.arch} at {args.resolution} px, guidance {args.guidance}; "
          "ours with the trainer's default checkpointing, the reference-style step with its policy UNet checkpointed")
    print(f"{'impl':>10} " + " ".join(f"{s[:11]:>11}" for s in STAGES[1:-2]) + f" {'total':>9}")
    for impl, stages in model.items():
        print(f"{impl:>10} " + " ".join(f"{stages.get(s, 0.0) / 1e12:>11.3f}" for s in STAGES[1:-2])
              + f" {sum(stages.values()) / 1e12:>9.3f}")


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    r0 = rows[0]
    print(f"\nsqdf_step: {r0['preset']} ({r0['arch']}, {r0['resolution']} px, {r0['sample_steps']} steps, guidance "
          f"{r0['guidance']}, {r0['weights_dtype']}, attention {r0['attention']}) on {r0['device_name']}, torch "
          f"{r0['torch']}, ops {r0['op_backend']}; peak: {r0['peak_kind']}")
    base = {r["micro_batch"]: r for r in rows if r["impl"] == "reference"}
    print(f"{'impl':>17} {'mb':>3} {'samples/s':>9} {'vs ref':>7} {'peak MiB':>9} {'vs ref':>7} {'RSS MiB':>8} "
          f"{'rollout s/traj':>14} {'bound %':>8}")
    for r in rows:
        ref = base.get(r["micro_batch"])
        speed = f"{r['samples_per_s'] / ref['samples_per_s']:.2f}x" if ref else "-"
        memory = f"{r['peak_mib'] / ref['peak_mib']:.2f}" if ref else "-"
        bound = f"{100 * r['bound_s_total'] / r['step_s']:.0f}" if r.get("bound_s_total") else "-"
        print(f"{r['impl']:>17} {r['micro_batch']:>3} {r['samples_per_s']:>9.3g} {speed:>7} {r['peak_mib']:>9.0f} "
              f"{memory:>7} {r['peak_rss_mib']:>8.0f} {r['rollout_s_per_traj']:>14.3g} {bound:>8}")
    print("\nseconds per step by stage (median):")
    print(f"{'impl':>17} {'mb':>3} " + " ".join(f"{s[:11]:>11}" for s in STAGES))
    for r in rows:
        print(f"{r['impl']:>17} {r['micro_batch']:>3} " + " ".join(f"{r['stages'][s]:>11.4f}" for s in STAGES))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
