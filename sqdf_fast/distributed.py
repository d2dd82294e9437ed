"""Data-parallel training over processes started by `torchrun` or `accelerate launch` (both set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT), with plain torch.distributed collectives and no DDP wrapper.

The base UNet is shared by the policy (adapter on), the reference (adapter off) and, for some tasks, other adapters,
which DDP's reducer does not follow; so the trainer averages the adapter's gradients itself with one all_reduce of
one flat buffer per optimizer step (`average_gradients`). A single process (WORLD_SIZE unset or 1) creates no
process group and every collective here is the identity, so single-process runs are unchanged.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Processes of this launch: WORLD_SIZE, as torchrun and accelerate set it; 1 without a launcher."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(value)
    except ValueError:
        world = 0
    if world < 1:
        raise ValueError(f"WORLD_SIZE={value!r}: must be a positive integer (set by torchrun / accelerate launch)")
    return world


def env_rank(name: str) -> int:
    value = os.environ.get(name, "0")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: must be an integer (set by torchrun / accelerate launch)") from None


def resolve_device(name: str, local_rank: int = 0, world: int = 1) -> torch.device:
    """The device of this process: `auto` is CUDA when present; with several processes on CUDA each takes
    cuda:LOCAL_RANK (config.validate refuses an explicit cuda:N then)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world > 1:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             "start at most that many processes per node")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def to_device(obj: Any, device: torch.device | str) -> Any:
    """obj with every tensor inside (nested dicts, lists, tuples) moved to `device`."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """A hash of names, dtypes, shapes and exact bytes: equal digests mean bit-identical tensors."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class Context:
    """This process's place in the launch: rank, world size, device, and the collectives the trainer uses."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # object collectives (checkpoint state, errors) go through a gloo group on the host, so that with NCCL they
    # neither stage pickles in GPU memory nor need a shared filesystem
    cpu_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def split(self, total: int, name: str) -> int:
        """This rank's part of the global count `name` (config.validate checks this first, naming the field)."""
        if total % self.world:
            raise ValueError(f"{name}={total}: must be divisible by the {self.world} processes (WORLD_SIZE)")
        return total // self.world

    def shard(self, total: int) -> slice:
        """This rank's rows of `total` (contiguous, sizes differing by at most one)."""
        base, extra = divmod(total, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    # collectives on tensors (the default group: NCCL on CUDA, gloo on the CPU) ------------------------------------
    def average_gradients(self, params: list[Tensor], finite: Tensor) -> Tensor:
        """Replace every rank's adapter gradients by their mean over the ranks, in one all_reduce of one flat
        buffer that also carries each rank's non-finite flag; returns the flag all ranks agree on (True only where
        every rank's loss was finite), so they all take or all skip the step and their parameters stay identical."""
        if not self.distributed:
            return finite
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [(~finite).to(grads[0].dtype).reshape(1)])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = g.copy_(flat[offset:offset + g.numel()].view_as(g)).div_(self.world)
            offset += g.numel()
        return flat[-1] == 0

    def mean(self, values: Tensor) -> Tensor:
        """The mean over ranks of a tensor of the same shape on every rank."""
        if not self.distributed:
            return values
        values = values.clone()
        dist.all_reduce(values)
        return values / self.world

    def gather_rows(self, rows: Tensor) -> Tensor:
        """Every rank's rows (first dimension; sizes may differ) concatenated in rank order, on every rank."""
        if not self.distributed:
            return rows
        counts = torch.zeros(self.world, dtype=torch.long, device=rows.device)
        counts[self.rank] = rows.shape[0]
        dist.all_reduce(counts)
        counts = counts.tolist()
        padded = rows.new_zeros((max(counts), *rows.shape[1:]))
        padded[:rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    # collectives on Python objects (host, gloo) ------------------------------------------------------------------
    def on_main(self, fn: Callable[[], Any]) -> Any:
        """fn() on rank 0 only (file-system checks and reads). If it raises, every rank raises (the others a
        ValueError or RuntimeError with its message), so no rank waits in a collective the others never reach.
        Returns fn's result on rank 0, None elsewhere."""
        result, failure, error = None, None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:  # noqa: BLE001 -- re-raised below, after the other ranks have been told
                failure, error = err, (isinstance(err, ValueError), str(err))
        if self.distributed:
            box = [error]
            dist.broadcast_object_list(box, src=0, group=self.cpu_group)
            error = box[0]
        if failure is not None:
            raise failure
        if error is not None:
            is_value_error, message = error
            raise ValueError(message) if is_value_error else RuntimeError(f"rank 0 failed: {message}")
        return result

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's obj on every rank (tensors arrive on the host)."""
        if not self.distributed:
            return obj
        box = [to_device(obj, "cpu") if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def gather(self, obj: Any) -> list | None:
        """[rank 0's obj, rank 1's, ...] on rank 0 (tensors on the host), None elsewhere."""
        obj = to_device(obj, "cpu")
        if not self.distributed:
            return [obj]
        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.cpu_group)
        return out

    def all_gather(self, obj: Any) -> list:
        """[rank 0's obj, rank 1's, ...] on every rank (small objects)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def scatter(self, objs: list | None) -> Any:
        """objs[r] (given on rank 0) on rank r (tensors on the host)."""
        if not self.distributed:
            return objs[0]
        box = [None]
        dist.scatter_object_list(box, objs if self.is_main else None, src=0, group=self.cpu_group)
        return box[0]


@contextmanager
def launch(device_name: str) -> Iterator[Context]:
    """This process's Context. With WORLD_SIZE > 1 it joins the process group (NCCL on CUDA, gloo on the CPU; the
    rendezvous from MASTER_ADDR/MASTER_PORT), and leaves it at the end; a group someone else initialised (e.g. an
    accelerate Accelerator made before calling the trainer) is used and left alone."""
    world = world_size()
    if world == 1:
        yield Context(device=resolve_device(device_name))
        return
    rank, local_rank = env_rank("RANK"), env_rank("LOCAL_RANK")
    device = resolve_device(device_name, local_rank, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owner = not dist.is_initialized()
    if owner:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise ValueError(f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, the environment "
                         f"says RANK={rank} of WORLD_SIZE={world}")
    cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    try:
        yield Context(rank, world, local_rank, device, cpu_group)
    finally:
        if owner:
            dist.destroy_process_group()
