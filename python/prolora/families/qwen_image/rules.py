"""What the Qwen-Image family tells the rest of prolora: how a LoRA's keys say it is for Qwen-Image."""
from __future__ import annotations

import re

from .keys import MEMBER

# the image / text streams' MLP and modulation under diffusers names, dotted or flattened
_QWEN = re.compile(r"(?:img|txt)_(?:mlp[._]net|mod[._]1)")


def lora_hint(lora) -> tuple[str, str] | None:
    """("qwen-image", how) when a LoRA's keys name Qwen-Image's dual-stream blocks."""
    if any(_QWEN.search(k) for k in lora.modules):
        return MEMBER, "Qwen-Image block names (img_mlp / txt_mlp / img_mod / txt_mod)"
    return None
