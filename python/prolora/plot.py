"""Figures of a report (needs the optional matplotlib extra)."""
from __future__ import annotations

from pathlib import Path

from .errors import OptionError
from .report import Report
from .safetensors_io import atomic_path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("--plot needs matplotlib: pip install 'prolora[plot]'") from None
    return plt


def phi_plot(report: Report, path: str | Path, tau: float | None = None, title: str = "") -> None:
    """phi_left / phi_right per layer, in model order, with the tau gate drawn."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    plt = _pyplot()
    rows = [r for r in report.layers if r.phi_left is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, min(24.0, len(rows) * 0.05)), 3.5))
    xs = range(len(rows))
    ax.plot(xs, [r.phi_left for r in rows], ".", ms=3, label="phi left (U)")
    ax.plot(xs, [r.phi_right for r in rows], ".", ms=3, label="phi right (V)")
    if tau is not None:
        ax.axhline(tau, color="red", lw=0.8, ls="--", label=f"tau = {tau:g}")
    # mark where the component / top-level block changes
    prev = None
    for i, r in enumerate(rows):
        block = ".".join((r.module or "").split(".")[:3])
        if prev is not None and block != prev:
            ax.axvline(i - 0.5, color="grey", lw=0.3)
        prev = block
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("phi (mean squared principal cosine)")
    ax.set_ylim(min(0.0, *(min(r.phi_left, r.phi_right) for r in rows)) if rows else 0.0, 1.02)
    ax.set_title(title or "subspace similarity per layer")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120)
    plt.close(fig)


def _block_and_role(module: str) -> tuple[str, str]:
    """'unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q' ->
    ('unet.down_blocks.1.attentions.0.transformer_blocks.0', 'attn1.to_q')."""
    parts = module.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].isdigit() and parts[i - 1] in ("transformer_blocks", "layers", "resnets", "double_blocks",
                                                   "single_blocks", "attentions"):
            return ".".join(parts[: i + 1]), ".".join(parts[i + 1:]) or parts[-1]
    return ".".join(parts[:-1]), parts[-1]


def transfer_heatmap(report: Report, path: str | Path, tau: float | None = None, title: str = "") -> None:
    """Two panels over blocks (rows) x layer roles (columns): min(phi_left, phi_right), and what
    happened to each LoRA module (transferred, below tau, no counterpart)."""
    import numpy as np

    path = Path(path)
    plt = _pyplot()
    rows = [r for r in report.layers if r.module]
    blocks, roles = [], []
    for r in rows:
        b, role = _block_and_role(r.module)
        if b not in blocks:
            blocks.append(b)
        if role not in roles:
            roles.append(role)
    phi_grid = np.full((len(blocks), len(roles)), np.nan)
    state = np.full((len(blocks), len(roles)), np.nan)  # 1 transferred, 0.5 below tau, 0 no counterpart
    for r in rows:
        b, role = _block_and_role(r.module)
        i, j = blocks.index(b), roles.index(role)
        if r.phi_left is not None and r.phi_right is not None:
            phi_grid[i, j] = min(r.phi_left, r.phi_right)
        state[i, j] = 1.0 if r.transferred else (0.5 if r.phi_left is not None else 0.0)
    h = max(3.0, min(30.0, 0.18 * len(blocks) + 1.5))
    fig, axes = plt.subplots(1, 2, figsize=(min(24.0, 4 + 0.9 * len(roles)), h), sharey=True)
    im = axes[0].imshow(phi_grid, aspect="auto", vmin=min(0.5, float(np.nanmin(phi_grid)) if np.isfinite(phi_grid).any() else 0.5),
                        vmax=1.0, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=axes[0], fraction=0.04, label="min(phi_left, phi_right)")
    axes[0].set_title("subspace similarity" + (f" (tau = {tau:g})" if tau is not None else ""))
    from matplotlib.colors import ListedColormap

    axes[1].imshow(state, aspect="auto", vmin=0, vmax=1, interpolation="nearest",
                   cmap=ListedColormap(["#999999", "#d95f02", "#1b9e77"]))
    axes[1].set_title("transferred (green) / below tau (orange) / no counterpart (grey)")
    for ax in axes:
        ax.set_xticks(range(len(roles)))
        ax.set_xticklabels(roles, rotation=60, ha="right", fontsize=7)
    axes[0].set_yticks(range(len(blocks)))
    axes[0].set_yticklabels([b if len(b) < 48 else "..." + b[-45:] for b in blocks], fontsize=6)
    fig.suptitle(title or "ProLoRA transfer, per block")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=110)
    plt.close(fig)
