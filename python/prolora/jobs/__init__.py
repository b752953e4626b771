"""The LoRA jobs built on truncated SVD: extract (a LoRA from two checkpoints), resize (a LoRA's
rank, on its factors) and merge (a weighted sum of LoRAs, recompressed). Each is a library call
here and a `prolora` subcommand (jobs.cli)."""
from __future__ import annotations

from .factors import RankRule, factor_svd

__all__ = ["RankRule", "factor_svd", "resize", "merge", "extract", "extract_many"]


def __getattr__(name: str):  # the job modules load on first use
    if name == "resize":
        from .resize import resize

        return resize
    if name == "merge":
        from .merge import merge

        return merge
    if name in ("extract", "extract_many"):
        from . import extract as _extract

        return getattr(_extract, name)
    raise AttributeError(f"module 'prolora.jobs' has no attribute {name!r}")
