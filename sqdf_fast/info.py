"""`python -m sqdf_fast.info`: versions, which backend each op uses on each device and why (compiler, build), and
which optional extras are installed."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from sqdf_fast import ops
from sqdf_fast.ops import dispatch

OPS = ("policy_step", "guided_policy_step", "rollout_step", "tweedie_x0", "consistency_x0", "sqdf_loss")
# optional package -> (distribution name, what it enables, how to install it)
EXTRAS = {
    "tensorboard": ("tensorboard", "--log-to tensorboard (the default when installed)",
                    "pip install 'sqdf_fast[tensorboard]'"),
    "wandb": ("wandb", "--log-to wandb", "pip install 'sqdf_fast[wandb]'"),
    "open_clip": ("open_clip_torch", "--reward hps", "pip install 'sqdf_fast[rewards]'"),
    "xformers": ("xformers", "xformers attention in bench/rollout.py (CUDA only)", "pip install xformers"),
}


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and the cores this process may use."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores)"


def report() -> list[str]:
    lines = [f"python {platform.python_version()} | torch {torch.__version__} | triton {version('triton')} | "
             f"diffusers {version('diffusers')} | peft {version('peft')} | transformers {version('transformers')} | "
             f"sqdf_fast {version('sqdf_fast')}"]
    cuda = torch.cuda.is_available()
    lines.append(f"CUDA: {torch.cuda.get_device_name() if cuda else 'not available'}")
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    lines.append(f"C++ compiler on PATH: {compiler or 'none'}")
    from sqdf_fast.ops import cpp
    if cpp.available():
        lines.append("C++ extension: " + ", ".join(f"{k} {v}" for k, v in cpp.build_info().items()))
    else:
        lines.append(f"C++ extension: unavailable ({cpp.unavailable_reason()})")
    choice, source = dispatch.requested()
    lines.append(f"requested backend: {choice} ({source}; set {dispatch.ENV_VAR}=torch|cpp|triton to override)")
    for device in ["cpu"] + (["cuda"] if cuda else []):
        try:
            backend, why = ops.backend_for(device)
        except ValueError as err:
            backend, why = "error", str(err)
        lines.append(f"{device} tensors:")
        lines.extend(f"  {name:20s} {backend:7s} {why}" for name in OPS)
    lines.append("optional extras:")
    for name, (distribution, enables, install) in EXTRAS.items():
        found = version(distribution)
        state = found if found == "not installed" else f"{found} installed"
        lines.append(f"  {name:12s} {state:18s} {enables}" + (f" ({install})" if found == "not installed" else ""))
    return lines


def main() -> None:
    print("\n".join(report()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
