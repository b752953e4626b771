"""Flux base models on disk: the BFL single file and the diffusers pipeline folder.

BFL files fuse what diffusers keeps apart (q, k, v [and the single blocks' mlp] concatenated, the
final modulation's halves swapped); the plan of which diffusers parameters make which BFL key is
the reader's own (checkpoints.flux.bfl_file_plan), so a synthetic file is read back by the same
map that reads real ones. The diffusers folder shards transformer/ like `save_pretrained` does.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..checkpoints.flux import COMPONENT, bfl_file_plan
from .configs import FluxConfig
from .params import Params
from .values import Values
from .writing import WEIGHTS, write_tensors


def write_flux(path: Path, cfg: FluxConfig, params: Params, layout: str, values: Values, dtype: torch.dtype,
               meta: dict[str, str], shard_bytes: int) -> None:
    """Write a Flux model at `path`: "single-file" (BFL keys), "single-file-prefixed" (BFL keys
    under ComfyUI's `model.diffusion_model.`) or "diffusers" (transformer/ in shards of at most
    `shard_bytes`, with an index when there is more than one)."""
    if layout.startswith("single-file"):
        _write_bfl(path, params, "model.diffusion_model." if layout == "single-file-prefixed" else "", values, dtype,
                   meta)
    else:
        _write_folder(path, cfg, params, values, dtype, meta, shard_bytes)


def _write_bfl(path: Path, params: Params, prefix: str, values: Values, dtype: torch.dtype,
               meta: dict[str, str]) -> None:
    shapes = dict(params)
    items = []
    for e in bfl_file_plan(params, prefix):
        def make(e=e):
            parts = [values(COMPONENT, n, shapes[n]) for n in e.sources]
            t = torch.cat(parts) if len(parts) > 1 else parts[0]
            if e.swap:
                a, b = t.chunk(2)
                t = torch.cat([b, a])
            return t
        items.append((e.key, e.shape, make))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(path, items, dtype, meta)


def _write_folder(path: Path, cfg: FluxConfig, params: Params, values: Values, dtype: torch.dtype,
                  meta: dict[str, str], shard_bytes: int) -> None:
    folder = path / COMPONENT
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.diffusers_config(), indent=2))
    itemsize = torch.tensor([], dtype=dtype).element_size()
    shards = _shards(params, itemsize, shard_bytes)
    n = len(shards)
    names = [f"{WEIGHTS}.safetensors"] if n == 1 else [f"{WEIGHTS}-{i + 1:05d}-of-{n:05d}.safetensors"
                                                       for i in range(n)]
    weight_map = {}
    for fname, shard in zip(names, shards):
        items = [(k, s, (lambda k=k, s=s: values(COMPONENT, k, s))) for k, s in shard]
        write_tensors(folder / fname, items, dtype, meta)
        weight_map.update({k: fname for k, _ in shard})
    if n > 1:
        total = sum(math.prod(s) * itemsize for _, s in params)
        (folder / f"{WEIGHTS}.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0",
         "transformer": ["diffusers", "FluxTransformer2DModel"]}, indent=2))


def _shards(params: Params, itemsize: int, shard_bytes: int) -> list[Params]:
    """Parameters in order, cut into runs of at most shard_bytes (a larger tensor alone)."""
    shards: list[Params] = [[]]
    size = 0
    for name, shape in params:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards
