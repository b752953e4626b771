"""Streaming tensors into a .safetensors file one at a time, so no model is ever whole in memory, and
a diffusers transformer folder (sharded like `save_pretrained`) made that way."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from ..safetensors_io import StreamingWriter

WEIGHTS = "diffusion_pytorch_model"  # diffusers' file stem for a model's weights

# (key, shape, a callable making the float tensor): the header is written from key and shape
# before any value exists, each value only when its turn comes
Item = tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]


def write_tensors(path: Path, items: list[Item], dtype: torch.dtype, metadata: dict[str, str]) -> None:
    """Write `items` to `path` in order, each cast to `dtype` as it is made."""
    entries = [(k, dtype, s) for k, s, _ in items]
    with StreamingWriter(path, entries, metadata) as w:
        for key, _, make in items:
            w.write(key, make().to(dtype).contiguous())


def write_transformer_folder(path: Path, cfg, params: list[tuple[str, tuple[int, ...]]], values,
                             dtype: torch.dtype, meta: dict[str, str], shard_bytes: int,
                             index: dict | None = None) -> None:
    """A pipeline folder holding one diffusers transformer, laid out like `save_pretrained`:
    transformer/ with config.json (`cfg.diffusers_config()`), the weights in shards of at most
    `shard_bytes` (with an index when more than one), values from `values("transformer", name,
    shape)`; and model_index.json (`index`, default: one naming the transformer's class, for the
    caller to replace with its pipeline's)."""
    folder = path / "transformer"
    folder.mkdir(parents=True, exist_ok=True)
    config = cfg.diffusers_config()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    itemsize = torch.tensor([], dtype=dtype).element_size()
    shards = _shards(params, itemsize, shard_bytes)
    n = len(shards)
    names = [f"{WEIGHTS}.safetensors"] if n == 1 else [f"{WEIGHTS}-{i + 1:05d}-of-{n:05d}.safetensors"
                                                       for i in range(n)]
    weight_map = {}
    for fname, shard in zip(names, shards):
        items = [(k, s, (lambda k=k, s=s: values("transformer", k, s))) for k, s in shard]
        write_tensors(folder / fname, items, dtype, meta)
        weight_map.update({k: fname for k, _ in shard})
    if n > 1:
        total = sum(math.prod(s) * itemsize for _, s in params)
        (folder / f"{WEIGHTS}.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if index is None:
        index = {"_class_name": "DiffusionPipeline", "_diffusers_version": config.get("_diffusers_version", "0.30.0"),
                 "transformer": ["diffusers", config.get("_class_name")]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


def _shards(params: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int) -> list:
    """Parameters in order, cut into runs of at most shard_bytes (a larger tensor alone)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in params:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards
