"""The driver's bases pass: compute (or find) in the basis cache every source and target basis
the LoRAs of a migration need, once, before any worker starts. No projection happens here.

Which modules a LoRA touches follows from its tensor names alone, so LoRAs with the same key set
share one plan: only one LoRA per key set is read in full.
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..transfers import matching_for
from ..cache import BasisCache
from ..checkpoints import BaseModel
from ..families import open_model
from ..engine import BasisProvider, Engine
from ..errors import ProloraError
from ..formats import read_lora
from ..options import TransferOptions
from ..plan import build_plan
from ..safetensors_io import read_header


@dataclass
class WarmStats:
    """What the bases pass did."""

    modules: int = 0  # source modules the LoRAs touch
    key_sets: int = 0  # distinct LoRA key sets (each planned once)
    bytes_read: int = 0  # base-model weight bytes read (0: every basis was already cached)
    seconds: dict[str, float] = field(default_factory=dict)
    source_id: str = ""
    target_id: str = ""


def _targets(src: BaseModel, tgt: BaseModel, loras: list[Path], opts: TransferOptions,
             mapping: dict[str, str] | None) -> tuple[dict[str, str], int]:
    """source module -> target module for every job of the LoRAs, and the number of key sets."""
    seen: set[frozenset[str]] = set()
    targets: dict[str, str] = {}
    for path in loras:
        try:
            keys = frozenset(read_header(path).tensors)
            if keys in seen:
                continue
            lf = read_lora(path)
            plan = build_plan(lf, src, tgt, lf.format if opts.format == "same" else opts.format, mapping,
                              opts.widths)
        except ProloraError:  # a bad LoRA fails in its worker, with the same message as transfer_many's
            continue
        seen.add(keys)
        for job in plan.jobs:
            targets.setdefault(job.module, job.target_module)
    return targets, len(seen)


def model_ids(source: str | Path, target: str | Path) -> tuple[str, str]:
    """The content identities of the two models (headers and sampled bytes only)."""
    with open_model(source) as src, open_model(target) as tgt:
        return src.identity(), tgt.identity()


def warm_cache(source: str | Path, target: str | Path, loras: list[Path], opts: TransferOptions,
               progress: Callable[[int, str], Callable[[int], None]] | None = None) -> WarmStats:
    """Fill the basis cache at `opts.cache_dir` with every basis `loras` need; returns what it did."""
    t0 = time.perf_counter()
    stats = WarmStats()
    cache = BasisCache(opts.cache_dir)
    with ExitStack() as stack:
        src = stack.enter_context(open_model(source))
        tgt = stack.enter_context(open_model(target))
        stats.source_id, stats.target_id = src.identity(), tgt.identity()
        mapping, _ = matching_for(src, tgt, opts, cache)
        targets, stats.key_sets = _targets(src, tgt, loras, opts, mapping)
        t1 = time.perf_counter()
        order = [m for m in src.weights if m in targets]
        stats.modules = len(order)
        if opts.method != "copy" and order:
            provider = BasisProvider(src, tgt, opts, cache)
            step = progress(len(order), "bases") if progress else None
            for chunk in Engine(src, tgt, opts, cache).chunks(order):
                provider.bases(provider.loader.prefetch(chunk, targets))
                if step:
                    step(len(chunk))
            stats.seconds.update({"load": round(provider.loader.seconds, 3),
                                  **{k: round(v, 3) for k, v in provider.seconds.items()}})
            stats.bytes_read = provider.loader.bytes_read
        stats.seconds["plan"] = round(t1 - t0, 3)
    stats.seconds["total"] = round(time.perf_counter() - t0, 3)
    return stats
