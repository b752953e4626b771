"""kohya-ss / A1111 / Forge LoRA files: `<prefix>_<path with _>.lora_down.weight`, `.lora_up.weight`,
`.alpha` (0-d). Module keys are kept exactly as written; names are never interpreted here."""
from __future__ import annotations

import re

import torch

from ..errors import InvalidLoraError
from ..lora import LoraFile, LoraModule
from .common import ADAPTER_SUFFIX_RE, ADAPTER_SUFFIXES, DOWN, UP, folded_up

NAME = "kohya"

# lora_unet (UNet or Flux DiT, BFL names), lora_transformer (Flux, diffusers names), lora_te (SD1/2 CLIP),
# lora_te1/lora_te2 (SDXL), lora_te3 (T5)
_MODULE = r"lora_(?:unet|te\d?|transformer)_[^.]+"
_KEY = re.compile(rf"^({_MODULE})\.(lora_down\.weight|lora_up\.weight|{ADAPTER_SUFFIX_RE})$")
_MODULE_RE = re.compile(rf"^{_MODULE}$")
_ROLES = {"lora_down.weight": DOWN, "lora_up.weight": UP, **ADAPTER_SUFFIXES}
# modules written with scale 1 (alpha = rank, scale folded into up): diffusers (0.42) converts
# kohya Flux LoRAs on the final layer without applying their alpha
_SCALE_FREE = ("lora_unet_final_layer_",)


def match(key: str) -> tuple[str, str] | None:
    """(module, role) for a kohya down/up key, else None."""
    m = _KEY.match(key)
    return (m.group(1), _ROLES[m.group(2)]) if m else None


def alpha_module(stem: str) -> str:
    """The module an `<stem>.alpha` key belongs to."""
    return stem


def is_module_key(key: str) -> bool:
    return bool(_MODULE_RE.match(key))


def to_tensors(lora: LoraFile, path: object) -> dict[str, torch.Tensor]:
    """kohya tensors; alpha is written for every module (rank when the module has none, scale 1).

    kohya and ComfyUI both read alpha with `.item()`, so a float32 0-d tensor is read exactly.
    """
    out: dict[str, torch.Tensor] = {}
    for name, m in lora.modules.items():
        if not is_module_key(name):
            raise InvalidLoraError(
                f"{path}: module key '{name}' is not a kohya name (lora_unet_... / lora_te_... with no dots)"
            )
        if m.bias is not None:
            raise InvalidLoraError(
                f"{path}: module '{name}' has a LoRA bias, which the kohya format cannot carry; write peft instead"
            )
        alpha = float(m.rank if m.alpha is None else m.alpha)
        up = m.up
        if name.startswith(_SCALE_FREE) and m.scale != 1.0:
            up, alpha = folded_up(m), float(m.rank)
        out[f"{name}.lora_down.weight"] = m.down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def effective_alpha(m: LoraModule) -> float:
    """The alpha a reader will see for this module once written."""
    return float(m.rank if m.alpha is None else m.alpha)
