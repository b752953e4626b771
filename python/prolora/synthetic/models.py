"""Synthetic base models on disk: write_model for any family config (the config writes its own
layouts, see configs), and the values context every family writer runs in (model_values).

Files are written one tensor at a time (writing.write_tensors), never the whole model in memory.
A TARGET model is its source plus a fine-tune-like perturbation of each weight (values.Values).
"""
from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..checkpoints import BaseModel
from ..families import open_model
from .configs import ConfigLike, resolve
from .params import model_params
from .values import Perturbation, Values


def write_model(path: str | os.PathLike, cfg: ConfigLike | None = None, layout: str = "diffusers",
                dtype: torch.dtype | None = None, seed: int = 0, base: str | os.PathLike | BaseModel | None = None,
                perturbation: Perturbation | float = Perturbation(), threads: int | None = None,
                shard_bytes: int | None = None, device: str | None = None) -> Path:
    """Write a synthetic base model; returns its path.

    `cfg`: a family config (ModelConfig, FluxConfig, QwenConfig, WanConfig, ...) or a preset name
    ("sdxl", "sd15:tiny", "ssd-1b:small", "flux-dev", "flux-schnell:tiny", "qwen-image:tiny",
    "wan2.1-t2v-14b:tiny", ...); None: the default preset (configs.default_preset, "sdxl:tiny").
    `layout`: one of the config's `layouts`: "diffusers" (a pipeline folder at `path`; a
    transformer/ in shards of at most `shard_bytes`, with an index), "single-file" (one
    .safetensors file with the family's original keys: LDM/SGM, BFL, Wan's, ...) and, for the
    transformer families, "single-file-prefixed" (those keys under ComfyUI's
    `model.diffusion_model.`).
    `dtype`: None is the config's own default (float16 where it names none; Qwen-Image and Wan:
    bfloat16).
    `base`: a source model (path or BaseModel) written earlier with the same config and seed;
    the result is then a TARGET: each source weight plus a `perturbation` (relative Frobenius
    size, or a Perturbation); other parameters equal the source's. A base of another family
    (FLUX.1-schnell under a "chroma" config) gives a derived model: the weights both have are
    perturbed from the base, the ones only the config has are drawn fresh.
    `threads`: torch threads while generating (default: the config's, else 1 below 100M
    parameters, else torch's).
    `device`: draw the values on this device (e.g. "cuda": a full-size pair in seconds); the
    values then differ from the CPU's, the shapes and layout do not.
    """
    cfg = resolve(cfg)
    if layout not in cfg.layouts:
        raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(cfg.layouts)}")
    path = Path(path)
    params = model_params(cfg)
    numel = sum(math.prod(s) for plist in params.values() for _, s in plist)
    if dtype is None:
        dtype = getattr(cfg, "dtype", torch.float16)
    if shard_bytes is None:
        shard_bytes = getattr(cfg, "shard_bytes", 10 * 2**30)
    threads = threads if threads is not None else getattr(cfg, "threads", None)
    facts = cfg.facts() if hasattr(cfg, "facts") else {}
    with model_values(cfg.family, seed, base, perturbation, device, threads, numel,
                      derived_from=getattr(cfg, "derived_from", ()), **facts) as (values, meta):
        cfg.write(path, params, layout, values, dtype, meta, shard_bytes)
    return path


@contextmanager
def model_values(family: str, seed: int, base: str | os.PathLike | BaseModel | None,
                 perturbation: Perturbation | float, device: str | None = None, threads: int | None = None,
                 numel: int = 0, derived_from: Iterable[str] = (), **facts) -> Iterator[tuple[Values, dict[str, str]]]:
    """(Values, file metadata) for writing one synthetic model of `family`: a source (`base`
    None) or a target of `base` (a path is opened here and closed after; a base of a member in
    `derived_from`, e.g. FLUX.1 for a Chroma config, lends the weights both have and the rest are
    drawn fresh). Runs with `threads` torch threads (None: one below 100M parameters (`numel`),
    else torch's). `facts` go into the metadata."""
    p = Perturbation(size=float(perturbation)) if isinstance(perturbation, (int, float)) else perturbation
    with ExitStack() as stack:
        if base is not None and not isinstance(base, BaseModel):
            base = stack.enter_context(open_model(base))
        derived = base is not None and base.family in tuple(derived_from)
        meta = {"prolora.synthetic": json.dumps({"family": family, **facts, "seed": seed,
                                                 "target_of": base.identity() if base is not None else None,
                                                 "perturbation": asdict(p) if base is not None else None})}
        if threads is None:
            threads = 1 if numel < 100_000_000 else 0
        with _threads(threads):
            yield Values(seed, base, p, device, new_modules=derived), meta


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with n torch threads, restoring the previous count (small matrices run faster on one
    thread, and far faster when other processes compete for the cores)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
