"""Sample-grid figures: one labelled row of generated images per candidate (samples.png)."""
from __future__ import annotations

from pathlib import Path

import torch

from .data import grid


def save_grid(path: Path, grids: list[tuple[str, torch.Tensor]]) -> None:
    """One row of samples per candidate, labelled."""
    import matplotlib  # only when drawing; the Agg backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(grids), 1, figsize=(12, 0.9 * len(grids) + 0.2), squeeze=False)
    for ax, (label, imgs) in zip(axes[:, 0], grids):
        ax.imshow(grid(imgs[:32], cols=32).numpy(), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(label, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
