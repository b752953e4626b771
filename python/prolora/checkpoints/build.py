"""Shared by the readers: turn {tensor key -> where it is} into WeightRefs, then into a BaseModel."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError
from ..safetensors_io import Header, TensorInfo
from .clip_keys import canonical_clip_name, is_lora_weight, openclip_to_transformers
from .family import detect_family, unet_stats
from .model import BaseModel, WeightRef
from .unet_keys import UnetStructure, diffusers_to_ldm, ldm_to_diffusers

# tensor key -> (file, header entry)
Tensors = dict[str, tuple[Path, TensorInfo]]


@dataclass
class Component:
    """The LoRA-able weights of one component (unet / text_encoder / text_encoder_2)."""

    name: str
    weights: dict[str, WeightRef] = field(default_factory=dict)
    ldm_names: dict[str, str] = field(default_factory=dict)  # unet only
    structure: UnetStructure | None = None
    facts: dict = field(default_factory=dict)


def _is_unet_weight(info: TensorInfo) -> bool:
    return info.name.endswith(".weight") and len(info.shape) in (2, 4)


def unet_from_diffusers(tensors: Tensors, where: str, prefix: str = "") -> Component:
    """UNet whose keys are diffusers names (after `prefix`).

    Every weight is kept; LDM/SGM names (for the kohya-ldm and comfy spellings) are derived where
    the layout has them: a UNet of an unusual structure simply gets none.
    """
    names = {k[len(prefix):]: k for k in tensors if k.startswith(prefix)}
    try:
        d2l, structure = diffusers_to_ldm(names, where, strict=False)
    except ModelError:
        d2l, structure = {}, None
    comp = Component("unet", structure=structure)
    for name, key in names.items():
        path, info = tensors[key]
        if _is_unet_weight(info):
            module = "unet." + name[: -len(".weight")]
            comp.weights[module] = WeightRef(module, path, key, info.shape, info.dtype)
            if name in d2l:
                comp.ldm_names[module] = d2l[name][: -len(".weight")]
    return comp


def unet_from_ldm(tensors: Tensors, where: str, prefix: str) -> Component:
    """UNet whose keys are LDM/SGM names under `prefix` (e.g. `model.diffusion_model.`)."""
    names = {k[len(prefix):]: k for k in tensors if k.startswith(prefix)}
    l2d, structure = ldm_to_diffusers(names, where)
    comp = Component("unet", structure=structure)
    for name, key in names.items():
        path, info = tensors[key]
        if _is_unet_weight(info):
            module = "unet." + l2d[name][: -len(".weight")]
            if module in comp.weights:
                raise ModelError(f"{where}: '{key}' and '{comp.weights[module].key}' map to the same weight")
            comp.weights[module] = WeightRef(module, path, key, info.shape, info.dtype)
            comp.ldm_names[module] = name[: -len(".weight")]
    return comp


def _encoder_facts(comp: Component, kind: str) -> None:
    layers = {int(m.group(1)) for m in (re.search(r"\.encoder\.layers\.(\d+)\.", n) for n in comp.weights) if m}
    q = comp.weights.get(f"{comp.name}.text_model.encoder.layers.0.self_attn.q_proj")
    comp.facts = {"kind": kind, "layers": len(layers), "hidden": q.shape[1] if q else None,
                  "projection": f"{comp.name}.text_projection" in comp.weights}


def clip_from_transformers(tensors: Tensors, component: str, prefix: str = "") -> Component:
    """Text encoder whose keys are transformers CLIP names (after `prefix`)."""
    comp = Component(component)
    for key, (path, info) in tensors.items():
        if not key.startswith(prefix):
            continue
        name = canonical_clip_name(key[len(prefix):])
        if is_lora_weight(name, len(info.shape)):
            module = f"{component}.{name[: -len('.weight')]}"
            comp.weights[module] = WeightRef(module, path, key, info.shape, info.dtype)
    _encoder_facts(comp, "clip")
    return comp


_T5_LINEAR = re.compile(r"^encoder\.block\.(\d+)\.layer\.\d+\.(SelfAttention\.[qkvo]|DenseReluDense\.w(i|i_0|i_1|o))\.weight$")


def t5_from_transformers(tensors: Tensors, component: str, prefix: str = "") -> Component:
    """A T5 encoder (transformers T5EncoderModel names after `prefix`, as in t5xxl_fp16.safetensors):
    the attention q/k/v/o and feed-forward wi_0/wi_1/wo linears of every block; embeddings and the
    relative-position bias table are not LoRA-able."""
    comp = Component(component)
    blocks = set()
    for key, (path, info) in tensors.items():
        hit = _T5_LINEAR.match(key[len(prefix):]) if key.startswith(prefix) else None
        if hit and len(info.shape) == 2:
            module = f"{component}.{key[len(prefix): -len('.weight')]}"
            comp.weights[module] = WeightRef(module, path, key, info.shape, info.dtype)
            blocks.add(int(hit.group(1)))
    q = comp.weights.get(f"{component}.encoder.block.0.layer.0.SelfAttention.q")
    comp.facts = {"kind": "t5", "layers": len(blocks), "hidden": q.shape[1] if q else None}
    return comp


def clip_from_openclip(tensors: Tensors, component: str, prefix: str, projection: bool) -> Component:
    """Text encoder stored OpenCLIP-style under `prefix`; q/k/v are row slices of in_proj_weight."""
    comp = Component(component)
    for key, (path, info) in tensors.items():
        if not key.startswith(prefix):
            continue
        for piece in openclip_to_transformers(key[len(prefix):]):
            if not is_lora_weight(piece.name, len(info.shape)):
                continue
            if piece.name == "text_projection.weight" and not projection:
                continue
            module = f"{component}.{piece.name[: -len('.weight')]}"
            shape, rows = info.shape, None
            if piece.part is not None:
                if shape[0] % 3:
                    raise ModelError(f"{path}: '{key}' has {shape[0]} rows, not a multiple of 3 (q, k, v)")
                h = shape[0] // 3
                rows, shape = (piece.part * h, (piece.part + 1) * h), (h, *shape[1:])
            if piece.transposed:
                shape = tuple(reversed(shape))
            comp.weights[module] = WeightRef(module, path, key, shape, info.dtype, rows, piece.transposed)
    _encoder_facts(comp, "openclip")
    return comp


def assemble(path: Path, layout: str, components: list[Component], files: dict[str, Path],
             headers: dict[Path, Header], name: str | None = None) -> BaseModel:
    """A BaseModel from components; the family is read from their structure."""
    weights: dict[str, WeightRef] = {}
    ldm_names: dict[str, str] = {}
    structure = None
    encoders: dict[str, dict] = {}
    has_unet = False
    for comp in components:
        if not comp.weights:
            continue
        weights.update(comp.weights)
        ldm_names.update(comp.ldm_names)
        if comp.name == "unet":
            structure, has_unet = comp.structure, True
        else:
            encoders[comp.name] = comp.facts
    if not weights:
        raise ModelError(f"{path}: no UNet or text-encoder weights found")
    if has_unet:
        te_hidden = {c: f["hidden"] for c, f in encoders.items() if f.get("hidden")}
        family = detect_family(unet_stats({m: r.shape for m, r in weights.items()}), te_hidden)
    else:
        family = "unknown"
    return BaseModel(path=path, name=name or path.name, layout=layout, family=family, weights=weights,
                     files=files, headers=headers, ldm_names=ldm_names, structure=structure,
                     text_encoders=encoders)
