"""Synthetic LoRAs for a base model, in each format and spelling its family's trainers write, keys
spelled through the model exactly as real trainers spell them.

write_lora opens the model and asks its family's synthetic part for the modules
(`write_lora_modules(model, format, rank, alpha, targets, seed, size, **options) -> (modules,
metadata)`; options such as `spelling`, `conv`, `split_qkv` are the family's) and writes them with
prolora.formats (or the part's `save_lora(path, lora, format, **options)` where the part writes a
layout of its own). The helpers here are the parts' shared building blocks.

Each module's factors come from their own seeded generator (spectra.generator("lora", seed,
name)), so a LoRA's values do not depend on which other modules it holds.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..checkpoints import BaseModel
from ..families import open_model
from ..formats import write_lora as write_lora_file
from ..lora import LoraFile, LoraModule
from ..safetensors_io import save as save_file
from .configs import synthetic_part
from .spectra import generator

TARGETS = ("attn", "transformer", "all")  # what a LoRA adapts (each family's lora targets say which modules)


def write_lora(model: str | os.PathLike | BaseModel, path: str | os.PathLike, format: str = "kohya", rank: int = 4,
               alpha: float | None = None, targets: str = "transformer", seed: int = 0, conv: bool = False,
               size: float = 0.05, split_qkv: bool = False, spelling: str | None = None, **options) -> Path:
    """Write a synthetic LoRA for `model` (a path or BaseModel); returns `path`.

    Keys are spelled for `format` through the model (kohya: the family's kohya spelling, or
    `spelling` where the family has several). Each module's delta scale * up @ down has
    Frobenius norm about `size` * sqrt(out), i.e. `size` relative to the synthetic weights.
    alpha defaults to rank / 2 (scale 0.5). targets: "attn" (attention projections),
    "transformer" (every linear of the transformer blocks, kohya's default; SD: with the text
    encoders'), "all" (also the embedders and the rest; SD convs only with `conv`).

    SD: formats kohya, peft, diffusers-old, comfy. Flux: kohya (BFL names; `spelling=
    "kohya-diffusers"` for `lora_transformer_` names), comfy, xlabs and peft; kohya/comfy/xlabs
    modules are the fused BFL ones (one down for q, k, v [and mlp]); `split_qkv` writes them in
    kohya's split_qkv form (a rank-`rank` pair per slice: down [n*rank, in], block-diagonal up).
    Qwen-Image: kohya (musubi), peft (`spelling="peft-bare"`: no prefix), comfy (`lora_ab=True`:
    ai-toolkit's lora_A/lora_B keys). Wan: peft, kohya (musubi), comfy. `options` go to the
    family's writer.
    """
    alpha = rank / 2 if alpha is None else float(alpha)
    with as_model(model) as m:
        part = synthetic_part(m.family)
        if part is None or not hasattr(part, "write_lora_modules"):
            raise ValueError(f"{m.name}: no synthetic LoRA writer for {m.family} models")
        mods, family = part.write_lora_modules(m, format, rank, alpha, targets, seed, size, split_qkv=split_qkv,
                                               spelling=spelling, conv=conv, **options)
    meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha), **family, "prolora.synthetic": "1"}
    path = Path(path)
    lora = LoraFile(format=format, modules=mods, metadata=meta)
    save = getattr(part, "save_lora", None)
    if save is not None:
        save(path, lora, format, **options)
    else:
        write_lora_file(path, lora, format)
    return path


def check_targets(targets: str) -> None:
    if targets not in TARGETS:
        raise ValueError(f"unknown targets {targets!r}; use 'attn', 'transformer' or 'all'")


def chosen(targets: str, attn: bool, transformer: bool) -> bool:
    """Whether a module is adapted under `targets`, given whether it is an attention projection
    and whether it is in a transformer ("all" takes every module offered)."""
    return {"attn": attn, "transformer": transformer}.get(targets, True)


def fit(up: torch.Tensor, down: torch.Tensor, scale: float, size: float) -> None:
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
        fit(up, down.reshape(rank, -1), alpha / rank, size)
        if len(shape) == 4:
            up = up.reshape(out, rank, 1, 1)
        key = m.spell(module, spelling)
        mods[key] = LoraModule(key, down.to(dtype), up.to(dtype), alpha)
    return mods


def format_spelling(format: str, spelling: str | None, spellings: dict[str, str], title: str,
                    lora_ab: bool = False) -> str:
    """The spelling a family's writer uses for `format` (the one given, else the family's table);
    ValueError for a format the family has no layout for, or `lora_ab` outside "comfy"."""
    spelling = spelling or spellings.get(format)
    if spelling is None:
        raise ValueError(f"format {format!r} has no {title} layout; use {', '.join(spellings)}")
    if lora_ab and format != "comfy":
        raise ValueError("lora_ab writes ai-toolkit's diffusion_model.*.lora_A/lora_B keys: format 'comfy' only")
    return spelling


def fused_pairs(m: BaseModel, modules: Iterable[str], spelling: str, rank: int, alpha: float, seed: int,
                size: float, split_qkv: bool = False) -> dict[str, LoraModule]:
    """One (down, up) pair per key `spelling` gives; a key that is one fused weight of several
    modules (Flux's qkv, a single block's linear1, ...) gets one down and an up whose row blocks
    are its slices' (under `split_qkv` kohya's split form: a rank-`rank` pair per slice, down
    [n*rank, in], block-diagonal up). Deterministic per (seed, key)."""
    groups: dict[str, list[tuple[str, tuple[tuple[int, int], ...] | None, int]]] = {}  # key -> [(module, rows, total)]
    for module in modules:
        if m.unspellable(module, spelling) is not None:
            continue
        fused = m.spell_fused(module, spelling)
        if fused is None:
            groups.setdefault(m.spell(module, spelling), []).append((module, None, m.weights[module].shape[0]))
        else:
            key, total, rows = fused
            groups.setdefault(key, []).append((module, rows, total))
    mods = {}
    for key, members in groups.items():
        g = generator("lora", seed, key)
        total, inp = members[0][2], m.weights[members[0][0]].shape[1]
        n = len(members) if split_qkv and members[0][1] is not None else 1
        down = torch.randn(n * rank, inp, generator=g) / math.sqrt(inp)
        up = torch.zeros(total, n * rank)
        for j, (_, rows, _) in enumerate(sorted(members, key=lambda x: x[1][0][0] if x[1] else 0)):
            cols = slice(j * rank, (j + 1) * rank) if n > 1 else slice(0, rank)
            for a, b in rows or ((0, total),):
                up[a:b, cols] = torch.randn(b - a, rank, generator=g)
        fit(up, down, alpha / (n * rank), size)
        mods[key] = LoraModule(key, down.half(), up.half(), alpha)
    return mods


def save_lora(path: Path, lora: LoraFile, format: str, lora_ab: bool = False, **_ignored: object) -> None:
    """A family part's `save_lora` hook for ai-toolkit's layout (`lora_ab`: lora_A / lora_B under
    `diffusion_model.`, the scale folded into B, no alpha), else the format's own."""
    if not lora_ab:
        write_lora_file(path, lora, format)
        return
    tensors = {}
    for key, mod in lora.modules.items():
        tensors[f"{key}.lora_A.weight"] = mod.down
        tensors[f"{key}.lora_B.weight"] = (mod.up.float() * mod.scale).to(mod.up.dtype)
    save_file(path, tensors, {"prolora.synthetic": "1"})


@contextmanager
def as_model(model: str | os.PathLike | BaseModel) -> Iterator[BaseModel]:
    """`model` as a BaseModel: opened from its path (and closed after) or used as given."""
    if isinstance(model, BaseModel):
        yield model
        return
    with open_model(model) as m:
        yield m
