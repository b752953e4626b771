"""XLabs (x-flux) Flux LoRA files: attention-processor LoRAs,
`double_blocks.N.processor.{qkv_lora1,proj_lora1,qkv_lora2,proj_lora2}.{down,up}.weight` (1: image
stream, 2: text stream) and `single_blocks.M.processor.{qkv_lora,proj_lora}.{down,up}.weight`,
sometimes under `diffusion_model.`. qkv_lora1/2 adapt img/txt_attn.qkv, proj_lora1/2 the attention
output projections; in single blocks qkv_lora adapts the q, k, v rows of linear1 (not its MLP rows)
and proj_lora adapts linear2. x-flux loads them with scale 1 and the files carry no alpha (an
`.alpha` key is accepted); the writer folds each module's scale into up."""
from __future__ import annotations

import re

import torch

from ..errors import InvalidLoraError
from ..lora import LoraFile, LoraModule
from .common import DOWN, UP, folded_up

NAME = "xlabs"

_MODULE = (r"(?:diffusion_model\.)?(?:double_blocks\.\d+\.processor\.(?:qkv_lora[12]|proj_lora[12])"
           r"|single_blocks\.\d+\.processor\.(?:qkv_lora|proj_lora))")
_KEY = re.compile(rf"^({_MODULE})\.(down|up)\.weight$")
_MODULE_RE = re.compile(rf"^{_MODULE}$")


def match(key: str) -> tuple[str, str] | None:
    """(module, role) for an XLabs down/up key, else None."""
    m = _KEY.match(key)
    return (m.group(1), DOWN if m.group(2) == "down" else UP) if m else None


def alpha_module(stem: str) -> str:
    return stem


def to_tensors(lora: LoraFile, path: object) -> dict[str, torch.Tensor]:
    """XLabs tensors: no alpha, so each module's scale is folded into its up weight."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora.modules.items():
        if not _MODULE_RE.match(name):
            raise InvalidLoraError(
                f"{path}: module key '{name}' is not an XLabs name (double_blocks.N.processor.qkv_lora1 ... / "
                "single_blocks.M.processor.qkv_lora / proj_lora)")
        if m.bias is not None or m.is_conv:
            raise InvalidLoraError(f"{path}: module '{name}' has a bias or conv weights, which XLabs files "
                                   "cannot carry")
        out[f"{name}.down.weight"] = m.down
        out[f"{name}.up.weight"] = folded_up(m)
    return out


def effective_alpha(m: LoraModule) -> float:
    return float(m.rank)
