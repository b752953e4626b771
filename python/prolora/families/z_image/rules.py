"""What the Z-Image family tells the rest of prolora: how a LoRA's keys say it is for Z-Image, and
the base-model metadata that names it."""
from __future__ import annotations

import re

from .keys import MEMBER

# LoRA metadata (ss_base_model_version / modelspec.architecture) substrings -> member
METADATA_HINTS = (("z-image", MEMBER), ("z_image", MEMBER), ("zimage", MEMBER))

# names only Z-Image's diffusers layout has (dotted or flattened): the refiners, the main blocks'
# attention as `attention.to_q` (Lumina 2's diffusers blocks say `attn.`), adaLN_modulation.0 (no
# SiLU; Lumina 2's is .1), the patch-size keyed embedder and final layer
_DIFFUSERS = re.compile(r"(?:noise|context)_refiner[._]\d+[._]|(?:^|[._])layers[._]\d+[._](?:attention[._]to_(?:q|k|v|out)"
                        r"|adaLN_modulation[._]0)|all_(?:x_embedder|final_layer)[._]2-1")
# the original names (ComfyUI's) are Lumina 2's too: a fused attention tells Z-Image by its shape
# (q, k and v of equal width; Lumina 2's k and v are a third of q's)
_FUSED = re.compile(r"(?:^|[._])layers[._]\d+[._]attention[._]qkv$")
_LUMINA = re.compile(r"adaLN_modulation[._]1(?:[._]|$)|[._]attn[._]to_")


def lora_hint(lora) -> tuple[str, str] | None:
    """("z-image", how) when a LoRA's keys name Z-Image's blocks."""
    keys = list(lora.modules)
    if any(_LUMINA.search(k) and "final_layer" not in k for k in keys):
        return None
    if any(_DIFFUSERS.search(k) for k in keys):
        return MEMBER, "Z-Image block names (refiners, layers.N.attention.to_q, adaLN_modulation.0)"
    for key in keys:
        m = lora.modules[key]
        if _FUSED.search(key) and m.out_features == 3 * m.in_features:
            return MEMBER, "Z-Image's fused attention (layers.N.attention.qkv, 3 x width rows)"
    return None
