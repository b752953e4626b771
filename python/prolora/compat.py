"""Adjustments so that diffusers' LoRA loaders read every module we write.

diffusers (0.42) converts a text encoder's LoRA keys with one mapping per encoder, chosen by
whether any key names an attention output projection: a kohya (or old-diffusers) encoder with
q/k/v but no out_proj anywhere loses its q/k/v silently, and a PEFT encoder with only MLP modules
is refused. When the similarity gate leaves such a set, one zero-delta module (up = 0, so the
merged weights are unchanged) is added to restore the mapping.
"""
from __future__ import annotations

import re
from collections import Counter

import torch

from .checkpoints import BaseModel
from .lora import LoraModule

_LAYER = re.compile(r"^(text_encoder(?:_2)?)\.(.*\.layers\.\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")


def pad_text_encoders(modules: dict[str, LoraModule], fmt: str, model: BaseModel) -> list[str]:
    """Add zero-delta modules (spelled like their neighbours) where diffusers would drop or refuse
    a text encoder's LoRA; returns one warning per module added."""
    per_encoder: dict[str, dict[str, set[str]]] = {}
    for key in modules:
        hit = model.resolve(key)
        m = _LAYER.match(hit[0]) if hit else None
        if m:
            per_encoder.setdefault(m.group(1), {}).setdefault(m.group(2), set()).add(m.group(3))
    warnings = []
    for encoder, layers in per_encoder.items():
        parts = set().union(*layers.values())
        attn = {p for p in parts if p.startswith("self_attn.")}
        if fmt == "peft":
            missing = None if attn else "self_attn.q_proj"
        else:
            missing = "self_attn.out_proj" if attn and "self_attn.out_proj" not in attn else None
        if missing is None:
            continue
        layer = sorted(layers)[0]
        module = f"{encoder}.{layer}.{missing}"
        ref = model.weights.get(module)
        if ref is None:
            continue
        neighbour = next(k for k in modules if (model.resolve(k) or ("",))[0].startswith(f"{encoder}.{layer}."))
        key = model.spell(module, model.resolve(neighbour)[1])
        rank, alpha, dtype = common_factors(modules.values())
        out, inp = ref.shape[0], ref.shape[1]
        modules[key] = LoraModule(key, torch.zeros(rank, inp, dtype=dtype), torch.zeros(out, rank, dtype=dtype), alpha)
        warnings.append(f"added a zero-delta {module} so that diffusers loads the {encoder} LoRA completely")
    return warnings


def common_factors(mods) -> tuple[int, float | None, torch.dtype]:
    """The rank, alpha and dtype most of `mods` (LoraModules) have: what a zero-delta module added
    beside them takes."""
    mods = list(mods)
    rank = Counter(m.rank for m in mods).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in mods).most_common(1)[0][0]
    dtype = Counter(m.up.dtype for m in mods).most_common(1)[0][0]
    return rank, alpha, dtype
