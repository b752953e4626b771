"""What the Wan family tells the rest of prolora: how a LoRA's keys say it is for Wan, which
members correspond, and which Wan pairs must not transfer."""
from __future__ import annotations

import re

from ...checkpoints.model import BaseModel
from .model import WanModel

# LoRA metadata (ss_base_model_version / modelspec.architecture) substrings -> member
METADATA_HINTS = (("wan", "wan"),)
# Wan 2.1 / 2.2 A14B and Wan 2.2 TI2V-5B: the same block layout at other widths (--widths lstsq)
RELATED = frozenset({("wan", "wan-ti2v"), ("wan-ti2v", "wan")})

# original names (musubi lora_unet_blocks_0_self_attn_q, ComfyUI diffusion_model.blocks.0.ffn.0) or
# diffusers ones (transformer.blocks.0.attn1.to_q, .ffn.net.0.proj); SD's are transformer_blocks.N
_WAN = re.compile(r"(?:^|[._])(?<!transformer_)blocks[._]\d+[._](?:self_attn|cross_attn|ffn|attn[12][._]to_)")


def lora_hint(lora) -> tuple[str, str] | None:
    """("wan", how) when a LoRA's keys name Wan blocks."""
    keys = list(lora.modules)
    if any(_WAN.search(k) for k in keys) and not any("transformer_blocks" in k for k in keys):
        return "wan", "Wan block names"
    return None


def pair_refusal(source: BaseModel, target: BaseModel, widths: str = "refuse") -> str | None:
    """Why a transfer between these two models must not run (None: it may). Wan only: a model
    that holds two experts is no single source or target, and models of other widths (Wan 2.2
    TI2V-5B vs a 14B layout) share no layer shape, unless `widths` is "lstsq"."""
    if not (isinstance(source, WanModel) or isinstance(target, WanModel)):
        return None
    for role, m in (("source", source), ("target", target)):
        if isinstance(m, WanModel) and m.experts and m.layout == "memory":
            return (f"{role} {m.name} is a pipeline holding both Wan 2.2 experts; pass one (pipe.transformer is the "
                    "high-noise, pipe.transformer_2 the low-noise expert), or load the LoRA onto both with "
                    "prolora.diffusers.load_lora(pipe, ...), which transfers it onto each expert")
        if isinstance(m, WanModel) and m.experts:
            return (f"{role} {m.path} holds both Wan 2.2 experts; name one ({m.path}/transformer is the high-noise, "
                    f"{m.path}/transformer_2 the low-noise expert), or transfer to the folder with "
                    "prolora.api.transfer_files / `prolora transfer`, which writes one LoRA per expert")
    if not (isinstance(source, WanModel) and isinstance(target, WanModel)):
        return None
    if source.hidden != target.hidden and widths != "lstsq":
        what = lambda m: f"{m.name} ({m.family}, {m.facts.get('variant')}, width {m.hidden})"  # noqa: E731
        return (f"source {what(source)} and target {what(target)} have different widths, so no layer has the same "
                "shape (Wan 2.2 TI2V-5B is a model of its own, not a 14B expert); pass --widths lstsq to map each "
                "layer by LoRA-X's least-squares map where the two subspaces agree")
    return None
