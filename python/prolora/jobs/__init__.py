"""The LoRA jobs built on truncated SVD: extract (a LoRA from two checkpoints: a pass over both on
the engine's planner, loader and memory governor), resize (a LoRA's rank, on its factors) and
merge (a weighted sum of LoRAs, recompressed); resize and merge compress through the method's
factor SVD. Each is a library call here and a `prolora` subcommand.

    extract      the pass: layers chosen, read ahead, differences, one output per tuned checkpoint
    extract_spec what decides an extraction and what it reports (ExtractOptions, ExtractResult)
    difference   the math of a chunk: differences, their truncated SVDs, the factors
    resize, merge, factors (rank rules, one alpha), bench (`prolora bench --job extract`)
"""
from __future__ import annotations

from .factors import RankRule

__all__ = ["RankRule", "resize", "merge", "extract", "extract_many"]


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
