"""Text encoders, shared by the families whose models carry them (CLIP-L, OpenCLIP-H/G, T5):
key maps between single-file spellings and transformers names, and the Component each reader
builds from a header.

CLIP key maps: single-file spellings <-> transformers CLIP names.

CLIP-L in LDM/SGM files already uses transformers names under a prefix. OpenCLIP (SD2's encoder,
SDXL's second encoder) stores q, k, v fused in `attn.in_proj_weight` [3C, C] (row slices q, k, v),
renames the MLP and norms, and stores `text_projection` as [in, out], the transpose of the
transformers Linear weight.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError
from ..safetensors_io import TensorInfo
from .model import WeightRef

# prefixes of single-file text encoders
CLIP_PREFIXES = {  # transformers-named CLIP inside single files
    "cond_stage_model.transformer.": "text_encoder",
    "conditioner.embedders.0.transformer.": "text_encoder",
}
OPENCLIP_PREFIXES = {
    "cond_stage_model.model.": "text_encoder",  # SD2.x OpenCLIP-H
    "conditioner.embedders.1.model.": "text_encoder_2",  # SDXL OpenCLIP-G
    "conditioner.embedders.0.model.": "text_encoder_2",  # SDXL refiner: OpenCLIP-G only
}

_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")
# OpenCLIP resblock part -> transformers layer part
_OPENCLIP_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
}


_BARE_CLIP_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")


def canonical_clip_name(name: str) -> str:
    """transformers CLIP parameter name in the classic `text_model.`-rooted form.

    transformers 5 saves CLIPTextModel without the `text_model.` wrapper (`encoder.layers.0...`);
    checkpoints in the wild, CLIPTextModelWithProjection and single files all use `text_model.`.
    """
    return "text_model." + name if name.startswith(_BARE_CLIP_ROOTS) else name


@dataclass(frozen=True)
class Piece:
    """One transformers parameter found inside a single-file tensor."""

    name: str  # transformers parameter name, e.g. text_model.encoder.layers.0.self_attn.q_proj.weight
    part: int | None = None  # 0/1/2 = q/k/v third of a fused in_proj tensor
    transposed: bool = False


def openclip_to_transformers(key: str) -> list[Piece]:
    """The transformers parameters stored in one OpenCLIP tensor (key without its file prefix).

    Returns [] for tensors with no transformers counterpart (logit_scale, attn_mask).
    """
    if key in _OPENCLIP_TOP:
        return [Piece(_OPENCLIP_TOP[key], transposed=key == "text_projection")]
    m = _RESBLOCK.match(key)
    if not m:
        return []
    layer, rest = m.group(1), m.group(2)
    base = f"text_model.encoder.layers.{layer}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = "weight" if rest.endswith("weight") else "bias"
        return [Piece(f"{base}self_attn.{p}_proj.{kind}", part=i) for i, p in enumerate("qkv")]
    module, _, kind = rest.rpartition(".")
    if module in _OPENCLIP_PARTS:
        return [Piece(f"{base}{_OPENCLIP_PARTS[module]}.{kind}")]
    return []


def transformers_to_openclip(name: str) -> tuple[str, int | None, bool] | None:
    """(OpenCLIP key, q/k/v part or None, transposed) for a transformers parameter name."""
    name = canonical_clip_name(name)
    for oc, tf in _OPENCLIP_TOP.items():
        if name == tf:
            return oc, None, oc == "text_projection"
    m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if not m:
        return None
    layer, module, kind = m.groups()
    base = f"transformer.resblocks.{layer}."
    for part, p in enumerate("qkv"):
        if module == f"self_attn.{p}_proj":
            return f"{base}attn.in_proj_{kind}", part, False
    for oc, tf in _OPENCLIP_PARTS.items():
        if module == tf:
            return f"{base}{oc}.{kind}", None, False
    return None


def is_lora_weight(name: str, ndim: int) -> bool:
    """A text-encoder parameter that is a linear weight LoRAs can target (not embeddings/norms)."""
    return name.endswith(".weight") and ndim == 2 and ".embeddings." not in name


# tensor key -> (file, header entry)
Tensors = dict[str, tuple[Path, TensorInfo]]


@dataclass
class Component:
    """The LoRA-able weights of one component (unet / text_encoder / text_encoder_2)."""

    name: str
    weights: dict[str, WeightRef] = field(default_factory=dict)
    ldm_names: dict[str, str] = field(default_factory=dict)  # unet only
    structure: object | None = None  # the UNet structure (families.sd.unet_keys.UnetStructure), unet only
    facts: dict = field(default_factory=dict)


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
