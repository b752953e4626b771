"""UNet key map between diffusers names and LDM/SGM names (SD1.x, SD2.x, SDXL, SSD-1B).

The map is derived from the structure found in the keys themselves (how many levels, resnets per
level, which blocks carry attention, whether the middle block has attention), never by rewriting
`_` or `.` textually. Both directions go through the same list of block rules, so converting one
way and back is the identity by construction.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from ...errors import ModelError

# resnet parameter names: diffusers <-> LDM
RESNET_D2L = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
RESNET_L2D = {v: k for k, v in RESNET_D2L.items()}

# blocks that are the same module under two names
PLAIN = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

DIFFUSERS_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "time_embedding.", "conv_out.")
LDM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.")


@dataclass
class UnetStructure:
    """The block layout of a UNet2DConditionModel-style network.

    `down_attn[i]` / `up_attn[i]`: the resnet positions j of level i that carry attention;
    `mid`: the middle block's parts in order, e.g. ["resnet", "attention", "resnet"].
    """

    layers: int  # resnets per down level (up levels have layers + 1)
    levels: int
    down_attn: list[set[int]]
    up_attn: list[set[int]]
    downsample: list[bool]
    upsample: list[bool]
    mid: list[str] = field(default_factory=list)

    def rules(self) -> list[tuple[str, str, bool]]:
        """(diffusers prefix, LDM prefix, is_resnet) for every block."""
        L = self.layers
        out = [(d, l, False) for d, l in PLAIN.items()]
        for i in range(self.levels):
            for j in range(L):
                n = 1 + i * (L + 1) + j
                out.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", True))
                if j in self.down_attn[i]:
                    out.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", False))
            if self.downsample[i]:
                out.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (L + 1)}.0.op", False))
        counts = {"resnet": 0, "attention": 0}
        for pos, kind in enumerate(self.mid):
            part = "resnets" if kind == "resnet" else "attentions"
            out.append((f"mid_block.{part}.{counts[kind]}", f"middle_block.{pos}", kind == "resnet"))
            counts[kind] += 1
        for i in range(self.levels):
            for j in range(L + 1):
                n = i * (L + 1) + j
                out.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", True))
                if j in self.up_attn[i]:
                    out.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", False))
            if self.upsample[i]:
                sub = 2 if L in self.up_attn[i] else 1
                out.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{i * (L + 1) + L}.{sub}.conv", False))
        return out


def _indices(keys: Iterable[str], pattern: str) -> dict[int, set[str]]:
    """{block index: set of the next name component} for keys matching `pattern.<n>.<next>.`"""
    rx = re.compile(re.escape(pattern) + r"\.(\d+)\.([^.]+)")
    found: dict[int, set[str]] = {}
    for k in keys:
        m = rx.match(k)
        if m:
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
    return found


def structure_from_diffusers(keys: Iterable[str], where: str) -> UnetStructure:
    """Read the block layout from diffusers parameter names (no prefix)."""
    keys = list(keys)
    down = _indices(keys, "down_blocks")
    up = _indices(keys, "up_blocks")
    if not down:
        raise ModelError(f"{where}: no down_blocks keys: not a diffusers UNet")
    levels = max(down) + 1
    if sorted(down) != list(range(levels)) or sorted(up) != list(range(levels)):
        raise ModelError(f"{where}: down_blocks {sorted(down)} and up_blocks {sorted(up)} do not form a UNet")

    def parts(prefix: str, what: str) -> set[int]:
        return set(_indices(keys, f"{prefix}.{what}"))

    L = len(parts("down_blocks.0", "resnets"))
    down_attn, up_attn = [], []
    for i in range(levels):
        if parts(f"down_blocks.{i}", "resnets") != set(range(L)):
            raise ModelError(f"{where}: down_blocks.{i} has resnets {sorted(parts(f'down_blocks.{i}', 'resnets'))}, "
                             f"expected {L} like down_blocks.0")
        if parts(f"up_blocks.{i}", "resnets") != set(range(L + 1)):
            raise ModelError(f"{where}: up_blocks.{i} has resnets {sorted(parts(f'up_blocks.{i}', 'resnets'))}, "
                             f"expected {L + 1}")
        down_attn.append(parts(f"down_blocks.{i}", "attentions"))
        up_attn.append(parts(f"up_blocks.{i}", "attentions"))
    has = lambda p: any(k.startswith(p) for k in keys)  # noqa: E731
    n_res = len(set(_indices(keys, "mid_block.resnets")))
    n_att = len(set(_indices(keys, "mid_block.attentions")))
    if n_res == 0:
        mid = []
    elif n_att == 0:
        mid = ["resnet"] * n_res
    elif n_res == n_att + 1:
        mid = ["resnet"] + ["attention", "resnet"] * n_att
    else:
        raise ModelError(f"{where}: mid_block has {n_res} resnets and {n_att} attentions; cannot order them")
    return UnetStructure(
        layers=L, levels=levels, down_attn=down_attn, up_attn=up_attn,
        downsample=[has(f"down_blocks.{i}.downsamplers.0.") for i in range(levels)],
        upsample=[has(f"up_blocks.{i}.upsamplers.0.") for i in range(levels)],
        mid=mid,
    )


def structure_from_ldm(keys: Iterable[str], where: str) -> UnetStructure:
    """Read the block layout from LDM/SGM parameter names (prefix `model.diffusion_model.` removed)."""
    keys = list(keys)
    inp = _indices(keys, "input_blocks")
    outp = _indices(keys, "output_blocks")
    if not inp or not outp:
        raise ModelError(f"{where}: no input_blocks/output_blocks keys: not an LDM UNet")
    ops = sorted(n for n in inp if any(k.startswith(f"input_blocks.{n}.0.op.") for k in keys))
    n_in = max(inp) + 1
    L = ops[0] - 1 if ops else n_in - 1
    if L < 1:
        raise ModelError(f"{where}: input_blocks.{ops[0]} is a downsampler where a resnet belongs")
    levels = len(ops) + 1
    for n in range(n_in):
        if n not in inp:
            raise ModelError(f"{where}: input_blocks.{n} is missing (blocks found: {sorted(inp)})")
    if n_in != levels * (L + 1):
        raise ModelError(f"{where}: input_blocks.{n_in - 1} maps nowhere: {levels} levels of {L} resnets "
                         f"explain only input_blocks 0..{levels * (L + 1) - 1}")
    want_ops = [(i + 1) * (L + 1) for i in range(levels - 1)]
    for n in ops:
        if n not in want_ops:
            raise ModelError(f"{where}: input_blocks.{n}.0.op maps nowhere: downsamplers belong at {want_ops}")
    n_out = levels * (L + 1)
    for n in sorted(outp):
        if n >= n_out:
            raise ModelError(f"{where}: output_blocks.{n} maps nowhere: {levels} levels of {L + 1} resnets "
                             f"explain only output_blocks 0..{n_out - 1}")
    for n in range(n_out):
        if n not in outp:
            raise ModelError(f"{where}: output_blocks.{n} is missing")

    def has(p: str) -> bool:
        return any(k.startswith(p) for k in keys)

    down_attn = [{j for j in range(L) if has(f"input_blocks.{1 + i * (L + 1) + j}.1.")} for i in range(levels)]
    up_attn = [
        {j for j in range(L + 1)
         if any(k.startswith(f"output_blocks.{i * (L + 1) + j}.1.") and
                not k.startswith(f"output_blocks.{i * (L + 1) + j}.1.conv.") for k in keys)}
        for i in range(levels)
    ]
    upsample = [has(f"output_blocks.{i * (L + 1) + L}.1.conv.") or has(f"output_blocks.{i * (L + 1) + L}.2.conv.")
                for i in range(levels)]
    mids = _indices(keys, "middle_block")
    if mids and sorted(mids) != list(range(max(mids) + 1)):
        raise ModelError(f"{where}: middle_block parts {sorted(mids)} are not contiguous")
    mid = ["resnet" if "in_layers" in mids[s] else "attention" for s in sorted(mids)]
    return UnetStructure(
        layers=L, levels=levels, down_attn=down_attn, up_attn=up_attn,
        downsample=[i < levels - 1 for i in range(levels)], upsample=upsample, mid=mid)


def _convert(keys: Iterable[str], rules: list[tuple[str, str, bool]], to_ldm: bool, where: str,
             strict: bool = True) -> dict[str, str]:
    table = {(d if to_ldm else l): ((l if to_ldm else d), res) for d, l, res in rules}
    names = RESNET_D2L if to_ldm else RESNET_L2D
    out: dict[str, str] = {}
    for key in keys:
        parts = key.split(".")
        for n in range(min(len(parts) - 1, 5), 0, -1):
            hit = table.get(".".join(parts[:n]))
            if hit is None:
                continue
            new_prefix, is_resnet = hit
            rest = parts[n:]
            if is_resnet:
                two = ".".join(rest[:2])
                if two in names:
                    rest = names[two].split(".") + rest[2:]
                elif rest[0] in names:
                    rest = names[rest[0]].split(".") + rest[1:]
                else:
                    raise ModelError(f"{where}: resnet parameter '{key}' maps nowhere")
            out[key] = ".".join([new_prefix, *rest])
            break
        else:
            if not strict:
                continue
            raise ModelError(f"{where}: UNet key '{key}' maps nowhere in the "
                             f"{'diffusers' if to_ldm else 'LDM/SGM'} -> {'LDM/SGM' if to_ldm else 'diffusers'} map")
    return out


def diffusers_to_ldm(keys: Iterable[str], where: str = "UNet", strict: bool = True
                     ) -> tuple[dict[str, str], UnetStructure]:
    """{diffusers key: LDM key} for every parameter key, plus the structure.

    strict=False leaves keys without an LDM counterpart (e.g. class_embedding) out of the map
    instead of raising.
    """
    keys = list(keys)
    s = structure_from_diffusers(keys, where)
    return _convert(keys, s.rules(), True, where, strict), s


def ldm_to_diffusers(keys: Iterable[str], where: str = "UNet") -> tuple[dict[str, str], UnetStructure]:
    """{LDM key: diffusers key} for every parameter key (prefix already removed), plus the structure."""
    keys = list(keys)
    s = structure_from_ldm(keys, where)
    return _convert(keys, s.rules(), False, where), s
