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
