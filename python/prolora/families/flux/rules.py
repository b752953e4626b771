"""What the FLUX.1 family tells the rest of prolora: how a LoRA's keys say it is for FLUX.1, and the
base-model metadata an extracted LoRA carries."""
from __future__ import annotations

import re

from ..flux2.rules import generation
from .chroma import CHROMA, FLUX

RELATED = frozenset({(FLUX, CHROMA), (CHROMA, FLUX)})
# LoRA metadata (ss_base_model_version / modelspec.architecture) substrings -> member
METADATA_HINTS = (("flux", FLUX),)

_FLUX = re.compile(r"double_blocks|single_blocks|single_transformer_blocks|^lora_transformer_")


def lora_hint(lora) -> tuple[str, str] | None:
    """("flux", how) when a LoRA's keys name FLUX.1 blocks (BFL or diffusers names) and neither
    they nor their shapes are FLUX.2's, which shares the block names (flux2.rules.generation tells
    the two apart; a LoRA of attention only, which both share, is taken for FLUX.1's)."""
    if not any(_FLUX.search(k) for k in lora.modules):
        return None
    hit = generation(lora)
    if hit is None or hit[0] == 0 and hit[1].startswith("Flux block names"):
        return FLUX, "Flux block names"
    return (FLUX, hit[1]) if hit[0] == 1 else None


def lora_metadata(model) -> dict[str, str]:
    """modelspec / kohya ss_* entries naming the base model of a LoRA extracted from `model`:
    FLUX.1 as kohya's Flux scripts write it (flux-1-dev / flux-1-schnell, "flux1"), Chroma by name."""
    if model.family == CHROMA:
        return {"modelspec.architecture": CHROMA, "modelspec.implementation": "diffusers",
                "modelspec.resolution": "1024x1024", "ss_base_model_version": CHROMA, "ss_v2": "False"}
    return {
        "modelspec.architecture": f"flux-1-{getattr(model, 'variant', 'dev')}",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        "modelspec.resolution": "1024x1024",
        "ss_base_model_version": "flux1",
        "ss_v2": "False",
    }
