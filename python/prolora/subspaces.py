"""Subspace similarity of two base models, and filling the basis cache: the engine's bases without
a LoRA (`prolora similarity`, `prolora cache build`)."""
from __future__ import annotations

import math
import os
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

from .cache import BasisCache
from .checkpoints import BaseModel
from .engine import BasisProvider, Engine
from .errors import InputFileError, OptionError
from .families import model_of
from .method import KMode
from .method import similarities as layer_similarities
from .ops import subspace_phi
from .ops.registry import override_for
from .options import TransferOptions
from .report import LayerRecord, Report

PathLike = str | os.PathLike
Progress = Callable[[int], None]
ProgressFactory = Callable[[int, str], Progress]


@dataclass
class SimilarityResult:
    report: Report


def similarity(source: PathLike | BaseModel, target: PathLike | BaseModel, *,
               subspace: KMode | str = "energy:0.9", tau: float = 0.8, layers: str | None = None,
               device: str = "cpu", backends: dict[str, str] | None = None, cache: bool = True,
               cache_dir: str | None = None, max_memory: int | str | None = None,
               progress: ProgressFactory | None = None) -> SimilarityResult:
    """Per-layer subspace similarity (phi) of every weight the two models share by name and shape.

    `layers` is a regular expression on canonical module names (e.g. 'attn|ff') to limit the work.
    """
    opts = TransferOptions(subspace=subspace, tau=tau, device=device, backends=backends or {}, cache=cache,
                           cache_dir=cache_dir, max_memory=max_memory)
    try:
        pattern = re.compile(layers) if layers else None
    except re.error as e:
        raise OptionError(f"--layers {layers!r}: not a regular expression ({e})") from None
    t0 = time.perf_counter()
    with ExitStack() as stack:
        src, tgt = model_of(source, stack), model_of(target, stack)
        names = [m for m, w in src.weights.items()
                 if (pattern is None or pattern.search(m)) and m in tgt.weights and tgt.weights[m].shape == w.shape]
        if not names:
            raise InputFileError(f"{src.name} and {tgt.name} share no weights"
                                 + (f" matching {layers!r}" if layers else ""))
        engine = Engine(src, tgt, opts, BasisCache(opts.cache_dir) if opts.cache else None)
        provider = BasisProvider(src, tgt, opts, engine.cache)
        step = progress(len(names), "similarity") if progress else None
        records = []
        override = override_for(subspace_phi, opts.backends)
        for chunk in engine.chunks(names):
            bases = provider.bases(provider.loader.prefetch(chunk))
            flat = {m: (src.weights[m].shape[0], math.prod(src.weights[m].shape[1:])) for m in chunk}
            sims = layer_similarities(bases, flat, override)
            for m in chunk:
                ok = min(sims[m]["phi_left"], sims[m]["phi_right"]) >= tau
                records.append(LayerRecord(m, m, m, src.weights[m].shape, ok, "above tau" if ok else "below tau",
                                           k=bases[m][0].k, gap=bases[m][0].gap(), **sims[m]))
            if step:
                step(len(chunk))
        info = {"source": src.name, "source_id": src.identity(), "target": tgt.name,
                "target_id": tgt.identity(), "subspace": str(opts.subspace), "tau": tau,
                "backend": ",".join(sorted(provider.backends)), "seconds": round(time.perf_counter() - t0, 3)}
    return SimilarityResult(Report(records, info))


def build_cache(model: PathLike | BaseModel, *, layers: str | None = None, subspace: str = "energy:0.9",
                backends: dict[str, str] | None = None, device: str = "cpu", max_memory: int | str | None = None,
                cache_dir: str | None = None, progress: ProgressFactory | None = None) -> int:
    """Compute and store the bases of a model's layers (those matching `layers`); returns how many."""
    opts = TransferOptions(subspace=subspace, backends=backends or {}, device=device, max_memory=max_memory,
                           cache_dir=cache_dir)
    pattern = re.compile(layers) if layers else None
    with ExitStack() as stack:
        m = model_of(model, stack)
        names = [n for n in m.weights if pattern is None or pattern.search(n)]
        engine = Engine(m, m, opts, BasisCache(cache_dir))
        provider = BasisProvider(m, m, opts, engine.cache)
        step = progress(len(names), "cache") if progress else None
        for chunk in engine.chunks(names):
            provider.bases(provider.loader.prefetch(chunk))
            if step:
                step(len(chunk))
    return len(names)


