"""`python -m sqdf_fast.info`: which backend each op uses on each device, and why (versions, compiler, build)."""
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
             f"diffusers {version('diffusers')} | sqdf_fast {version('sqdf_fast')}"]
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
    return lines


def main() -> None:
    print("\n".join(report()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
