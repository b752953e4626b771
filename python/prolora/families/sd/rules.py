"""What the SD family tells the rest of prolora: how a LoRA's keys say it is for SD, the block
layout matching reads, and the base-model metadata an extracted LoRA carries."""
from __future__ import annotations

import re
from collections import Counter

from .detect import SDXL_KIN

# LoRA metadata (ss_base_model_version / modelspec.architecture) substrings -> member
METADATA_HINTS = (
    ("sdxl", "sdxl"), ("stable-diffusion-xl", "sdxl"),
    ("sd_v2", "sd2"), ("stable-diffusion-v2", "sd2"),
    ("sd_v1", "sd1"), ("stable-diffusion-v1", "sd1"),
)
_CROSS_ATTN_WIDTH = {2048: "sdxl", 768: "sd1", 1024: "sd2"}
_CROSS_KV = re.compile(r"attn2[._](?:processor[._])?to_[kv]$")
_SGM = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_")
_SECOND_TE = ("lora_te1_", "lora_te2_", "text_encoders.clip_g.", "text_encoder_2.")


def lora_hint(lora) -> tuple[str, str] | None:
    """(member, how) when a LoRA's keys or shapes say it is for an SD model: a second text
    encoder (SDXL), the cross-attention k/v input width, kohya's SGM block names."""
    keys = list(lora.modules)
    if any(k.startswith(_SECOND_TE) for k in keys):
        return "sdxl", "second text encoder"
    widths = Counter(m.in_features for k, m in lora.modules.items() if _CROSS_KV.search(k) and not m.is_conv)
    for width, _ in widths.most_common():
        if width in _CROSS_ATTN_WIDTH:
            return _CROSS_ATTN_WIDTH[width], f"cross-attention k/v input width {width}"
    if any(_SGM.search(k) for k in keys):
        return "sdxl", "kohya SGM block names"
    return None


_BLOCK = re.compile(r"^(?P<attn>unet\.(?:(?:down|up)_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+))"
                    r"\.transformer_blocks\.(?P<idx>\d+)\.(?P<role>.+)$")


def block_of(module: str) -> tuple[str, int, str] | None:
    """'unet.up_blocks.0.attentions.1.transformer_blocks.3.attn1.to_q' -> (attention, 3, 'attn1.to_q'):
    the transformer blocks whose depth SDXL's pruned kin change, for similarity matching."""
    m = _BLOCK.match(module)
    return (m["attn"], int(m["idx"]), m["role"]) if m else None


_ARCH = {"sdxl": "stable-diffusion-xl-v1-base", "ssd-1b": "stable-diffusion-xl-v1-base",
         "sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v"}
_KOHYA_BASE = {"sdxl": "sdxl_base_v1-0", "ssd-1b": "sdxl_base_v1-0", "sd1": "sd_v1", "sd2": "sd_v2"}


def lora_metadata(model) -> dict[str, str]:
    """modelspec / kohya ss_* entries naming the base model of a LoRA extracted from `model`."""
    fam = model.family
    return {
        "modelspec.architecture": _ARCH.get(fam, fam),
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models" if fam == "sdxl"
                                     else "diffusers"),
        "modelspec.resolution": {"sd1": "512x512", "sd2": "768x768"}.get(fam, "1024x1024"),
        "ss_base_model_version": _KOHYA_BASE.get(fam, fam),
        "ss_v2": str(fam == "sd2"),
    }


RELATED = frozenset((a, b) for a in SDXL_KIN for b in SDXL_KIN if a != b)
