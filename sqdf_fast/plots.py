"""Sample grids and training curves as PNG files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def save_grid(images: Tensor, path: str | Path, nrow: int, scale: int = 4) -> None:
    """Tile (N, C, H, W) images in [-1, 1] into a grid of `nrow` columns, upscaled `scale` times, as a PNG."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = torch.zeros((c, rows * (h + 1) + 1, nrow * (w + 1) + 1), dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = images[i]
    array = grid.permute(1, 2, 0).numpy().repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(array[..., 0] if c == 1 else array).save(path)


def save_curves(rows: list[dict], path: str | Path, keys: tuple[str, ...]) -> None:
    """One panel per metric key against the step, from metrics.jsonl rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in keys if any(k in row for row in rows)]
    ncols = min(5, len(keys))
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        points = np.array([(row["step"], row[key]) for row in rows if key in row], dtype=float)
        ax.plot(points[:, 0], points[:, 1], marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
