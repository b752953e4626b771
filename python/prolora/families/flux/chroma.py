"""What Chroma is, next to FLUX.1: the layers it lacks and why (for reports), and how its extra
layers are named.

Chroma (diffusers ChromaTransformer2DModel, from FLUX.1-schnell) is read by the same code as family
"chroma": the same double and single blocks at the same widths, without the modulation linears
(img_mod / txt_mod -> norm1.linear / norm1_context.linear, single-block modulation -> norm.linear,
final_layer.adaLN_modulation -> norm_out.linear) and without time_in / vector_in / guidance_in
(time_text_embed.*: Chroma's time_text_embed has no weights). What it adds is the modulation
approximator, whose 2-D weights are

    BFL                                            canonical (diffusers)
    distilled_guidance_layer.in_proj / out_proj    distilled_guidance_layer.in_proj / out_proj
    distilled_guidance_layer.layers.N.in_layer     distilled_guidance_layer.layers.N.linear_1
    distilled_guidance_layer.layers.N.out_layer    distilled_guidance_layer.layers.N.linear_2
    (distilled_guidance_layer.norms.N.scale        distilled_guidance_layer.norms.N.weight, no LoRA target)

(diffusers' convert_chroma_transformer_checkpoint_to_diffusers). Its pipeline has a T5 encoder in
text_encoder/ and no CLIP-L. A Flux LoRA's modules on what Chroma lacks get no counterpart and are
dropped and named in the report (`missing_hint`); the output holds no key for them.
"""
from __future__ import annotations

import re

from typing import Iterable

from .keys import APPROX, COMPONENT

FLUX, CHROMA = "flux", "chroma"  # the family's members (BaseModel.family)


def member(modules: Iterable[str]) -> str:
    """"chroma" where the transformer has Chroma's modulation approximator, else "flux"."""
    return CHROMA if any(m.startswith(f"{COMPONENT}.{APPROX}") for m in modules) else FLUX

# what Chroma lacks of FLUX.1, by canonical prefix (inside the transformer), and why
_CHROMA_LACKS = (
    (re.compile(r"^transformer_blocks\.\d+\.norm1\.linear$"), "img_mod",
     "Chroma pruned the double blocks' modulation; its distilled_guidance_layer computes it"),
    (re.compile(r"^transformer_blocks\.\d+\.norm1_context\.linear$"), "txt_mod",
     "Chroma pruned the double blocks' modulation; its distilled_guidance_layer computes it"),
    (re.compile(r"^single_transformer_blocks\.\d+\.norm\.linear$"), "single-block modulation",
     "Chroma pruned it; its distilled_guidance_layer computes it"),
    (re.compile(r"^norm_out\.linear$"), "final_layer.adaLN_modulation",
     "Chroma pruned it; its distilled_guidance_layer computes it"),
    (re.compile(r"^time_text_embed\.timestep_embedder\."), "time_in",
     "Chroma feeds the timestep to its distilled_guidance_layer"),
    (re.compile(r"^time_text_embed\.text_embedder\."), "vector_in", "Chroma has no pooled CLIP-L input"),
    (re.compile(r"^time_text_embed\.guidance_embedder\."), "guidance_in", "Chroma has no guidance embedder"),
)


def chroma_lacks(module: str, name: str = "Chroma") -> str | None:
    """Why a Chroma model has no `module` (a canonical FLUX.1 id), or None if Chroma should have it."""
    component, _, path = module.partition(".")
    if component == "text_encoder":
        return f"{name} has no CLIP-L text encoder (Chroma conditions on T5 only)"
    if component != COMPONENT:
        return None
    for rx, what, why in _CHROMA_LACKS:
        if rx.match(path):
            return f"{name} has no {what} ({why})"
    return None
