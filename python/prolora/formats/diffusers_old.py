"""Old diffusers LoRA files (before the PEFT backend), in their three spellings:

    unet.<path>.to_q.lora.down.weight                     (LoRACompatible layers)
    unet.<path>.attn1.processor.to_q_lora.down.weight     (attention processors; to_out_lora = to_out.0)
    text_encoder.<path>.q_proj.lora_linear_layer.down.weight

All are normalised to the dotted module path (`unet.<path>.attn1.to_q`). In text encoders the
processor names map to CLIP's projections (to_q_lora -> q_proj, to_out_lora -> out_proj), as
diffusers does. No alpha unless the file has `<module>.alpha` keys."""
from __future__ import annotations

import re

import torch

from ..errors import InvalidLoraError
from ..lora import LoraFile, LoraModule
from .common import DOWN, UP, folded_up

NAME = "diffusers-old"

_KEY = re.compile(r"^(.+?)(\.lora|\.lora_linear_layer|\.to_(?:q|k|v|out)_lora)\.(down|up)\.weight$")
_PROC = re.compile(r"^(?:(.*)\.)?(to_(?:q|k|v|out)_lora)$")
_UNET_NAMES = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_TE_NAMES = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


def _is_text_encoder(parent: str) -> bool:
    return parent.split(".", 1)[0].startswith("text_encoder") or parent.endswith("self_attn")


def normalise(stem: str) -> str:
    """The dotted module path for a raw stem such as `unet.x.attn1.processor.to_q_lora`."""
    for tail in (".lora_linear_layer", ".lora"):
        if stem.endswith(tail):
            stem = stem[: -len(tail)]
            break
    parts = [p for p in stem.split(".") if p != "processor"]
    stem = ".".join(parts)
    m = _PROC.match(stem)
    if m:
        parent, proc = m.group(1), m.group(2)
        names = _TE_NAMES if _is_text_encoder(parent) else _UNET_NAMES
        stem = f"{parent}.{names[proc]}" if parent else names[proc]
    return stem


def match(key: str) -> tuple[str, str] | None:
    """(module, role) for an old-diffusers down/up key, else None."""
    m = _KEY.match(key)
    if not m:
        return None
    stem = m.group(1) + m.group(2)
    return normalise(stem), DOWN if m.group(3) == "down" else UP


def alpha_module(stem: str) -> str:
    return normalise(stem)


def to_tensors(lora: LoraFile, path: object) -> dict[str, torch.Tensor]:
    """Old-diffusers tensors (`.lora.down/up` for the UNet, `.lora_linear_layer.down/up` for text
    encoders); no alpha, so the scale is folded into up."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora.modules.items():
        if "." not in name or name.startswith(("diffusion_model.", "text_encoders.")) or normalise(name) != name:
            raise InvalidLoraError(
                f"{path}: module key '{name}' is not a dotted diffusers module path "
                "(unet.<path> / text_encoder.<path>)"
            )
        if m.bias is not None:
            raise InvalidLoraError(
                f"{path}: module '{name}' has a LoRA bias, which the diffusers-old format cannot carry; "
                "write peft instead"
            )
        tail = "lora_linear_layer" if name.split(".", 1)[0].startswith("text_encoder") else "lora"
        out[f"{name}.{tail}.up.weight"] = folded_up(m)
        out[f"{name}.{tail}.down.weight"] = m.down
    return out


def effective_alpha(m: LoraModule) -> float:
    return float(m.rank)
