"""Synthetic LoRAs for a base model, in each format prolora reads (kohya, PEFT, diffusers-old,
ComfyUI; for Flux also XLabs), their keys spelled through the model exactly as real trainers
spell them.

Each module's factors come from their own seeded generator (spectra.generator("lora", seed,
name)), so a LoRA's values do not depend on which other modules it holds.
"""
from __future__ import annotations

import importlib.util
import math
import os
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterable, Iterator, Mapping

import torch

from ..checkpoints import BaseModel, WeightRef
from .. import families
from ..families import open_model
from ..formats import write_lora as write_lora_file
from ..lora import LoraFile, LoraModule
from .spectra import generator

TARGETS = ("attn", "transformer", "all")  # what a LoRA adapts (see lora_targets and the families' own)
_ATTN = (".attn1.", ".attn2.", ".self_attn.")


def write_lora(model: str | os.PathLike | BaseModel, path: str | os.PathLike, format: str = "kohya", rank: int = 4,
               alpha: float | None = None, targets: str = "transformer", seed: int = 0, conv: bool = False,
               size: float = 0.05, split_qkv: bool = False, spelling: str | None = None) -> Path:
    """Write a synthetic LoRA for `model` (a path or BaseModel); returns `path`.

    Keys are spelled for `format` through the model (kohya: the family's kohya spelling). Each
    module's delta scale * up @ down has Frobenius norm about `size` * sqrt(out), i.e. `size`
    relative to the synthetic weights. alpha defaults to rank / 2 (scale 0.5).

    Flux: formats kohya (BFL names; `spelling="kohya-diffusers"` for `lora_transformer_` names),
    comfy, xlabs and peft. kohya/comfy/xlabs modules are the fused BFL ones (one down for q, k, v
    [and mlp]); `split_qkv` writes them in kohya's split_qkv form (a rank-`rank` pair per slice:
    down [n*rank, in], block-diagonal up). targets: "attn" (attention projections), "transformer"
    (every linear of the double and single blocks, kohya's default), "all" (also the embedders,
    guidance_in and the final layer); XLabs files hold only what XLabs can name.
    """
    alpha = rank / 2 if alpha is None else float(alpha)
    with as_model(model) as m:
        part = _synthetic_part(m)
        if part is not None and hasattr(part, "write_lora_modules"):  # the family writes its own
            mods, family = part.write_lora_modules(m, format, rank, alpha, targets, seed, size, split_qkv=split_qkv,
                                                   spelling=spelling, conv=conv)
        else:
            mods = _unet_modules(m, format, rank, alpha, targets, seed, size, conv)
            family = {}
    meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha), **family, "prolora.synthetic": "1"}
    path = Path(path)
    write_lora_file(path, LoraFile(format=format, modules=mods, metadata=meta), format)
    return path


def lora_targets(modules: Mapping[str, WeightRef], targets: str = "transformer", conv: bool = False) -> Iterator[str]:
    """Canonical module ids a LoRA of this kind adapts (text_projection never).

    "attn": attention projections (UNet attn1/attn2, text-encoder self_attn);
    "transformer": every linear (and 1x1 conv) in UNet transformers plus all text-encoder layer
    linears, like kohya's defaults; "all": also resnets, time embeddings, samplers, conv_in/out
    (3x3 convs only with conv=True).
    """
    _check_targets(targets)
    for module, ref in modules.items():
        if module.endswith("text_projection"):
            continue
        is_te = not module.startswith("unet.")
        k3 = len(ref.shape) == 4 and ref.shape[2:] != (1, 1)
        if k3 and not conv:
            continue
        if _chosen(targets, attn=any(a in module for a in _ATTN), transformer=is_te or ".attentions." in module):
            yield module


def _check_targets(targets: str) -> None:
    if targets not in TARGETS:
        raise ValueError(f"unknown targets {targets!r}; use 'attn', 'transformer' or 'all'")


def _chosen(targets: str, attn: bool, transformer: bool) -> bool:
    """Whether a module is adapted under `targets`, given whether it is an attention projection
    and whether it is in a transformer ("all" takes every module offered)."""
    return {"attn": attn, "transformer": transformer}.get(targets, True)


def _fit(up: torch.Tensor, down: torch.Tensor, scale: float, size: float) -> None:
    """Scale `up` in place so that scale * up @ down has Frobenius norm size * sqrt(rows)."""
    delta = (up @ down).norm() * scale
    up *= size * math.sqrt(up.shape[0]) / delta


def spelled_pairs(m: BaseModel, modules: Iterable[str], spelling: str, rank: int, alpha: float, seed: int,
                  size: float, dtype: torch.dtype = torch.float16) -> dict[str, LoraModule]:
    """One (down, up) pair per module, keyed as `spelling` spells it (modules the spelling has no
    name for are left out); convs get a kxk down and a 1x1 up. Deterministic per (seed, module)."""
    mods = {}
    for module in modules:
        if m.unspellable(module, spelling) is not None:
            continue
        shape = m.weights[module].shape
        g = generator("lora", seed, module)
        out, rest = shape[0], shape[1:]
        down = torch.randn((rank, *rest), generator=g) / math.sqrt(math.prod(rest))
        up = torch.randn(out, rank, generator=g)
        _fit(up, down.reshape(rank, -1), alpha / rank, size)
        if len(shape) == 4:
            up = up.reshape(out, rank, 1, 1)
        key = m.spell(module, spelling)
        mods[key] = LoraModule(key, down.to(dtype), up.to(dtype), alpha)
    return mods


def _synthetic_part(m: BaseModel) -> ModuleType | None:
    """The synthetic part of `m`'s family (prolora.families.<f>.synthetic), where it has one."""
    fam = families.of(m)
    if fam is None or not fam.has("synthetic") or importlib.util.find_spec(fam.parts["synthetic"]) is None:
        return None
    return fam.part("synthetic")


@contextmanager
def as_model(model: str | os.PathLike | BaseModel) -> Iterator[BaseModel]:
    """`model` as a BaseModel: opened from its path (and closed after) or used as given."""
    if isinstance(model, BaseModel):
        yield model
        return
    with open_model(model) as m:
        yield m


def _unet_modules(m: BaseModel, format: str, rank: int, alpha: float, targets: str, seed: int, size: float,
                  conv: bool) -> dict[str, LoraModule]:
    """One (down, up) pair per adapted UNet / text-encoder module (convs: a kxk down, a 1x1 up)."""
    spelling = {"kohya": m.kohya_spelling, "peft": "peft", "diffusers-old": "peft", "comfy": "comfy"}.get(format)
    if spelling is None:
        raise ValueError(f"unknown format {format!r}")
    return spelled_pairs(m, lora_targets(m.weights, targets, conv), spelling, rank, alpha, seed, size)
