"""ComfyUI-saved LoRA files: `diffusion_model.<LDM/SGM/BFL module>.lora_up.weight` / `.lora_down.weight`
and `text_encoders.clip_l.transformer.<...>` / `text_encoders.clip_g.transformer.<...>`, usually without
alpha (an `.alpha` key is accepted). The dotted `diffusion_model.` / `text_encoders.` prefix tells
them apart from kohya files. Some tools write `lora_A`/`lora_B` under the same prefixes; ComfyUI
reads those too, so they are accepted here as comfy."""
from __future__ import annotations

import re

import torch

from ..errors import InvalidLoraError
from ..lora import LoraFile, LoraModule
from .common import ADAPTER_SUFFIX_RE, ADAPTER_SUFFIXES, DOWN, UP, folded_up

NAME = "comfy"
PREFIXES = ("diffusion_model.", "text_encoders.")

_KEY = re.compile(r"^((?:diffusion_model|text_encoders)\..+)\.(lora_down\.weight|lora_up\.weight|lora_A\.weight|"
                  rf"lora_B\.weight|{ADAPTER_SUFFIX_RE})$")
_ROLES = {"lora_down.weight": DOWN, "lora_up.weight": UP, "lora_A.weight": DOWN, "lora_B.weight": UP,
          **ADAPTER_SUFFIXES}


def match(key: str) -> tuple[str, str] | None:
    """(module, role) for a comfy down/up key, else None."""
    m = _KEY.match(key)
    return (m.group(1), _ROLES[m.group(2)]) if m else None


def alpha_module(stem: str) -> str:
    return stem


def to_tensors(lora: LoraFile, path: object) -> dict[str, torch.Tensor]:
    """comfy tensors: no alpha, so each module's scale is folded into its up weight."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora.modules.items():
        if not name.startswith(PREFIXES) or len(name) <= len(name.split(".", 1)[0]) + 1:
            raise InvalidLoraError(
                f"{path}: module key '{name}' is not a ComfyUI name (diffusion_model.<module> or "
                "text_encoders.<encoder>.<module>)"
            )
        out[f"{name}.lora_up.weight"] = folded_up(m)
        out[f"{name}.lora_down.weight"] = m.down
        if m.bias is not None:  # ComfyUI adds `<module>.diff_b` to the module's bias
            out[f"{name}.diff_b"] = m.bias
    return out


def effective_alpha(m: LoraModule) -> float:
    return float(m.rank)
