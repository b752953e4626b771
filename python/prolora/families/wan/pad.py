"""Wan's loader quirk: diffusers' musubi-tuner converter needs every attention and ffn module of
each block it counts (the family's `pad_output` hook)."""
from __future__ import annotations

import torch

from ...checkpoints.model import BaseModel
from ...compat import common_factors
from ...lora import LoraModule
from .keys import BLOCK, BLOCK_LINEARS, COMPONENT
from .model import WanModel


def pad_musubi_blocks(modules: dict, fmt: str, model: BaseModel) -> list[str]:
    """Add zero-delta modules (up = 0: merged weights unchanged) to a kohya/musubi Wan output
    where diffusers' loader would fail: its musubi converter (0.42,
    `_convert_musubi_wan_lora_to_diffusers`) reads every q/k/v/o of both attentions and ffn.0/ffn.2
    of blocks 0..n-1 (n = the number of blocks named) and raises on any that is missing, e.g. a
    layer the similarity gate dropped. Returns one warning, or none when nothing was added."""
    if fmt != "kohya" or not isinstance(model, WanModel):
        return []
    have = {model.resolve(k)[0] for k in modules if model.resolve(k) is not None}
    blocks = {int(m.group(1)) for m in (BLOCK.match(h.partition(".")[2]) for h in have) if m}
    if not blocks:
        return []
    rank, alpha, dtype = common_factors(modules.values())
    roles = [r for r in BLOCK_LINEARS if not r.endswith("_img")]
    added = []
    for i in range(max(blocks) + 1):  # the converter counts the blocks named and reads 0..n-1
        for role in roles:
            module = f"{COMPONENT}.blocks.{i}.{BLOCK_LINEARS[role]}"
            ref = model.weights.get(module)
            if module in have or ref is None:
                continue
            key = model.spell(module, "kohya-ldm")
            modules[key] = LoraModule(key, torch.zeros(rank, ref.shape[1], dtype=dtype),
                                      torch.zeros(ref.shape[0], rank, dtype=dtype), alpha)
            added.append(module)
    if not added:
        return []
    return [f"added {len(added)} zero-delta modules (e.g. {added[0]}) so that diffusers' musubi-tuner converter, "
            "which needs every attention and ffn module of each block it counts, loads the file"]
