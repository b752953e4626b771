"""LoRA modules on fused weights, split into per-module parts and assembled back.

Flux stores q, k and v of an attention (and, in single blocks, the MLP input too) as one fused
weight (`img_attn.qkv` [3h, h], `linear1` [3h + mlp, h]); kohya, ComfyUI and XLabs LoRAs adapt
the fused weight with one module, diffusers/PEFT LoRAs adapt q, k, v and proj_mlp separately.
prolora transfers each logical slice on its own (see families/flux/model.py), so:

- reading: `split_module` cuts a fused LoRA module into one module per slice: the slice's rows of
  up, the shared down. Columns of up that are zero on those rows are dropped with their down rows
  (exact: they contribute nothing there), so kohya's split_qkv form (down [3r, h], up
  block-diagonal [3h, 3r]) gives rank-r slices, not rank-3r ones.
- writing: the plan names each transferred slice with a *part key*, `<fused key>[a:b/total]` (the
  rows of the output module's up that are this slice's rows), and `assemble_parts` puts the parts
  of one output module back together: with their common down when they share it (a copied
  module comes back bit for bit), else block-diagonally (down = the parts' downs stacked, up =
  each part's up in its rows and its own columns) - kohya's split_qkv layout, which kohya,
  ComfyUI and diffusers all read (diffusers splits it back exactly).
"""
from __future__ import annotations

import re

import torch

from ..errors import InvalidLoraError
from ..lora import LoraModule

Rows = tuple[tuple[int, int], ...]

_PART = re.compile(r"^(.+)\[(\d+:\d+(?:,\d+:\d+)*)/(\d+)\]$")
# |1 - factor| below this is treated as 1, so that regrouping scales never touches the bits
_UNIT = 1e-12


def part_key(key: str, rows: Rows, total: int) -> str:
    """The name of the part of output module `key` whose rows are `rows` (of `total`)."""
    return f"{key}[{','.join(f'{a}:{b}' for a, b in rows)}/{total}]"


def parse_part_key(name: str) -> tuple[str, Rows, int] | None:
    """(output module key, rows, total) for a part key, else None."""
    m = _PART.match(name)
    if m is None:
        return None
    rows = tuple((int(a), int(b)) for a, b in (p.split(":") for p in m.group(2).split(",")))
    return m.group(1), rows, int(m.group(3))


def _take(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    if len(rows) == 1 and rows[0] == (0, t.shape[0]):
        return t
    return torch.cat([t[a:b] for a, b in rows])


def split_module(lm: LoraModule, rows: Rows) -> LoraModule | None:
    """The part of `lm` on the up rows `rows`, with the same dW on those rows; None if it is zero
    there. Zero columns of the part's up are dropped with their down rows; the alpha is adjusted
    so that the part's scale (alpha / its rank) equals `lm`'s."""
    up = _take(lm.up, rows)
    bias = _take(lm.bias, rows) if lm.bias is not None else None
    extra = dict(kind=lm.kind, error=lm.error)
    if lm.magnitude is not None:  # DoRA: per-row magnitudes cut like up; the slice changes even where up is 0
        if lm.dora_axis != "out":
            raise InvalidLoraError(f"DoRA module '{lm.key}' normalises per input column, across every slice of "
                                   "the fused weight it adapts; prolora cannot cut it into the slices")
        extra.update(magnitude=_take(lm.magnitude, rows), dora_axis=lm.dora_axis, dora_eps=lm.dora_eps)
        return LoraModule(lm.key, lm.down, up, lm.alpha, bias, **extra)
    flat = up.reshape(up.shape[0], up.shape[1])
    used = (flat != 0).any(dim=0)
    if not bool(used.any()):
        return None
    if bool(used.all()):
        return LoraModule(lm.key, lm.down, up, lm.alpha, bias, **extra)
    idx = torch.nonzero(used).flatten()
    alpha = None if lm.alpha is None else lm.scale * int(idx.numel())
    return LoraModule(lm.key, lm.down[idx], up[:, idx], alpha, bias, **extra)


def _place(dst: torch.Tensor, src: torch.Tensor, rows: Rows, cols: slice) -> None:
    at = 0
    for a, b in rows:
        dst[a:b, cols] = src[at:at + b - a]
        at += b - a


def _fuse(key: str, parts: list[tuple[Rows, int, LoraModule]]) -> LoraModule:
    totals = {t for _, t, _ in parts}
    if len(totals) != 1:
        raise InvalidLoraError(f"parts of '{key}' disagree on its rows: {sorted(totals)}")
    total = totals.pop()
    taken = torch.zeros(total, dtype=torch.bool)
    for rows, _, m in parts:
        n = sum(b - a for a, b in rows)
        if n != m.up.shape[0] or any(not 0 <= a <= b <= total for a, b in rows):
            raise InvalidLoraError(f"part {rows} of '{key}' does not fit its {m.up.shape[0]} rows into {total}")
        for a, b in rows:
            if bool(taken[a:b].any()):
                raise InvalidLoraError(f"two parts of '{key}' claim rows of {a}:{b}")
            taken[a:b] = True
    # block order = row order, so that the result is block-diagonal in kohya's split_qkv sense
    parts = sorted(parts, key=lambda p: p[0][0][0])
    mods = [m for _, _, m in parts]
    first = mods[0]
    dtype = first.up.dtype
    has_bias = any(m.bias is not None for m in mods)
    bias = torch.zeros(total, dtype=next(m.bias for m in mods if m.bias is not None).dtype) if has_bias else None
    if has_bias:
        for rows, _, m in parts:
            if m.bias is not None:
                at = 0
                for a, b in rows:
                    bias[a:b] = m.bias[at:at + b - a]
                    at += b - a
    shared = all(m.alpha == first.alpha and m.down.shape == first.down.shape and
                 (m.down is first.down or torch.equal(m.down, first.down)) for m in mods)
    if shared:
        up = torch.zeros((total, first.rank), dtype=dtype)
        for rows, _, m in parts:
            _place(up, m.up.to(dtype), rows, slice(None))
        return LoraModule(key, first.down, up, first.alpha, bias)
    rank = sum(m.rank for m in mods)
    scales = {m.scale for m in mods}
    if all(m.alpha is None for m in mods):
        alpha, scale = None, 1.0
    elif len(scales) == 1:
        alpha = scales.pop() * rank
        scale = alpha / rank
    else:
        alpha, scale = float(rank), 1.0
    up = torch.zeros((total, rank), dtype=dtype)
    col = 0
    for rows, _, m in parts:
        factor = m.scale / scale
        u = m.up if abs(factor - 1.0) < _UNIT else (m.up.double() * factor)
        _place(up, u.to(dtype), rows, slice(col, col + m.rank))
        col += m.rank
    down = torch.cat([m.down.to(first.down.dtype) for m in mods])
    return LoraModule(key, down, up, alpha, bias)


def assemble_parts(modules: dict[str, LoraModule]) -> dict[str, LoraModule]:
    """Modules with every group of part keys replaced by its assembled module (at the position of
    its first part); the same dict when there are no part keys."""
    if not any(k.endswith("]") and parse_part_key(k) for k in modules):
        return modules
    groups: dict[str, list[tuple[Rows, int, LoraModule]]] = {}
    order: list[tuple[bool, str]] = []
    for name, m in modules.items():
        hit = parse_part_key(name)
        if hit is None:
            order.append((False, name))
            continue
        key, rows, total = hit
        if key not in groups:
            groups[key] = []
            order.append((True, key))
        groups[key].append((rows, total, m))
    out: dict[str, LoraModule] = {}
    for is_group, name in order:
        if not is_group:
            if name in groups:
                raise InvalidLoraError(f"module '{name}' is written both whole and in parts")
            out[name] = modules[name]
        else:
            out[name] = _fuse(name, groups[name])
    return out


def canonical_modules(modules: dict[str, LoraModule], model) -> dict[str, LoraModule]:
    """A LoRA's modules keyed by the canonical module ids of `model` (a checkpoints.BaseModel),
    fused modules cut into their slices (zero slices left out); keys the model does not know are
    kept as they are. Lets LoRAs in different layouts (kohya fused qkv, PEFT split) be compared."""
    out: dict[str, LoraModule] = {}
    for key, m in modules.items():
        hit = model.resolve(key)
        if hit is not None:
            out[hit[0]] = m
            continue
        fused = model.resolve_fused(key)
        if fused is None or m.out_features != fused.rows:
            out[key] = m
            continue
        for s in fused.slices:
            part = split_module(m, s.rows)
            if part is not None:
                out[s.module] = part
    return out
