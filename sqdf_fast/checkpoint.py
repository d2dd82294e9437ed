"""Atomic, checksummed run checkpoints: adapter weights (safetensors) plus optimizer, RNG, buffer and step state.

A checkpoint is written to `checkpoint.tmp/` (each file fsynced) and swapped in by renames, so `checkpoint/` (or,
during the swap, `checkpoint.prev/`) is always a complete one. `checksums.json`, written last, holds the SHA-256 of
each file; `load` verifies them, so a flipped byte or a partial copy is refused even where the file still parses.

state.pt holds what all data-parallel ranks share (step, optimizer, base metrics, guard, wall time), `world_size`,
and `ranks`: one entry per rank with what is its own (RANK_KEYS: RNG state, the method's state (replay-buffer shard,
last samples), log window, and the digest of its adapter). A single process writes one entry.
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sqdf_fast.files import fsync_file, fsync_folder, sha256

ADAPTER = "adapter.safetensors"
STATE = "state.pt"
CHECKSUMS = "checksums.json"
SHARED_KEYS = ("step", "optimizer", "base_metrics", "guard", "metrics_rows", "metrics_digest")
RANK_KEYS = ("generator", "method", "window")


def save(run_dir: Path, adapter: dict, state: dict) -> Path:
    final, tmp, prev = run_dir / "checkpoint", run_dir / "checkpoint.tmp", run_dir / "checkpoint.prev"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.cpu() for k, v in adapter.items()}, str(tmp / ADAPTER))
    torch.save(state, tmp / STATE)
    for name in (ADAPTER, STATE):
        fsync_file(tmp / name)
    (tmp / CHECKSUMS).write_text(json.dumps({name: sha256(tmp / name) for name in (ADAPTER, STATE)}, indent=1))
    fsync_file(tmp / CHECKSUMS)
    fsync_folder(tmp)
    if final.exists():
        shutil.rmtree(prev, ignore_errors=True)
        final.rename(prev)
    tmp.rename(final)
    fsync_folder(run_dir)
    shutil.rmtree(prev, ignore_errors=True)
    return final


def verify(folder: Path, what: str) -> None:
    """Each file of the checkpoint in `folder` against checksums.json; ValueError naming the file that differs."""
    try:
        expected = json.loads((folder / CHECKSUMS).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{what}: {folder / CHECKSUMS} is missing or unreadable ({type(err).__name__}), so the "
                         "checkpoint cannot be verified") from err
    for name in (ADAPTER, STATE):
        if not (folder / name).is_file():
            raise ValueError(f"{what}: checkpoint is unreadable ({folder / name} is missing)")
        if sha256(folder / name) != expected.get(name):
            raise ValueError(f"{what}: {folder / name} does not match its checksum (changed after it was written: "
                             "a damaged disk or copy); the checkpoint is not used")


def load(run_dir: Path, map_location: torch.device | str = "cpu") -> tuple[dict, dict]:
    """(adapter, state) of the run's checkpoint; ValueError with the reason when missing or unreadable."""
    folder = run_dir / "checkpoint"
    if not folder.is_dir() and (run_dir / "checkpoint.prev").is_dir():
        folder = run_dir / "checkpoint.prev"   # interrupted during the swap: the previous one is complete
    if not folder.is_dir():
        raise ValueError(f"resume={str(run_dir)!r}: no checkpoint/ folder")
    verify(folder, f"resume={str(run_dir)!r}")
    try:
        adapter = {k: v.to(map_location) for k, v in load_file(str(folder / ADAPTER)).items()}
        state = torch.load(folder / STATE, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, SafetensorError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise ValueError(f"resume={str(run_dir)!r}: checkpoint is unreadable ({type(err).__name__}: {err})") from err
    missing = set(SHARED_KEYS + ("world_size", "ranks")) - set(state)
    missing |= {name for entry in state.get("ranks", []) for name in RANK_KEYS if name not in entry}
    if missing:
        raise ValueError(f"resume={str(run_dir)!r}: checkpoint lacks {', '.join(sorted(missing))}")
    if state["world_size"] != len(state["ranks"]):
        raise ValueError(f"resume={str(run_dir)!r}: checkpoint has world_size {state.get('world_size')} but "
                         f"{len(state['ranks'])} rank entries")
    return adapter, state
