"""How the project writes the files a run cannot afford to lose or misread.

- Atomically: every rewritten file goes to `NAME.tmp`, is fsynced and renamed over `NAME` (and the folder fsynced),
  so a kill at any moment leaves the old file or the new one, never an empty or half-written one.
- Strict JSON: a non-finite float (NaN, Inf), which `json` would write as the non-standard `NaN`, is written as
  `null`; the writer is told which keys, so that the log can say why.
- Digests: `sha256` of a file, which a checkpoint records for each of its files and `--resume` verifies.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable


def fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` then rename over `path`: a reader (or a resume after a kill) sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_folder(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda p: p.write_text(text))


def finite_json(value, where: str = "") -> tuple[object, list[str]]:
    """`value` with every non-finite float replaced by None, and the keys (dotted paths) that were replaced."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [where or "value"]
    if isinstance(value, dict):
        replaced, out = [], {}
        for key, item in value.items():
            out[key], found = finite_json(item, f"{where}.{key}" if where else str(key))
            replaced += found
        return out, replaced
    if isinstance(value, (list, tuple)):
        replaced, out = [], []
        for i, item in enumerate(value):
            item, found = finite_json(item, f"{where}[{i}]")
            out.append(item)
            replaced += found
        return out, replaced
    return value, []


def dumps(value, **kwargs) -> tuple[str, list[str]]:
    """Strict JSON text of `value` (non-finite floats as null) and the keys written as null for being non-finite."""
    value, replaced = finite_json(value)
    return json.dumps(value, allow_nan=False, **kwargs), replaced


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

