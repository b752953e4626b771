"""summarize(): the facts `prolora inspect` shows about a LoRA file."""
from __future__ import annotations

import re
from collections import Counter

from ..lora import LoraFile

# ss_base_model_version / modelspec.architecture substrings -> family
_META_FAMILIES = [
    ("sdxl", "sdxl"), ("stable-diffusion-xl", "sdxl"),
    ("flux", "flux"),
    ("wan", "wan"),
    ("sd3", "sd3"), ("stable-diffusion-v3", "sd3"), ("stable-diffusion-3", "sd3"),
    ("sd_v2", "sd2"), ("stable-diffusion-v2", "sd2"),
    ("sd_v1", "sd1"), ("stable-diffusion-v1", "sd1"),
]
_CROSS_ATTN_WIDTH = {2048: "sdxl", 768: "sd1", 1024: "sd2"}
_CROSS_KV = re.compile(r"attn2[._](?:processor[._])?to_[kv]$")
_FLUX = re.compile(r"double_blocks|single_blocks|single_transformer_blocks|^lora_transformer_")
_SGM = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_")
# Wan: original names (musubi lora_unet_blocks_0_self_attn_q, ComfyUI diffusion_model.blocks.0.ffn.0) or
# diffusers ones (transformer.blocks.0.attn1.to_q, .ffn.net.0.proj); SD's are transformer_blocks.N
_WAN = re.compile(r"(?:^|[._])(?<!transformer_)blocks[._]\d+[._](?:self_attn|cross_attn|ffn|attn[12][._]to_)")
# Qwen-Image: the image / text streams' MLP and modulation under diffusers names, dotted or flattened
_QWEN = re.compile(r"(?:img|txt)_(?:mlp[._]net|mod[._]1)")

# key prefix -> component, most specific first; "unet" means the denoiser (UNet or DiT)
_COMPONENTS = [
    ("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
    ("unet.", "unet"), ("transformer.", "unet"), ("text_encoder.", "text_encoder"),
    ("text_encoder_2.", "text_encoder_2"),
    ("diffusion_model.", "unet"), ("text_encoders.clip_l.", "text_encoder"),
    ("text_encoders.clip_g.", "text_encoder_2"),
    ("lora_transformer_", "unet"), ("double_blocks.", "unet"), ("single_blocks.", "unet"),  # Flux: kohya-diffusers, XLabs
    ("transformer_blocks.", "unet"),  # Qwen-Image LoRAs without a prefix
]


def component_of(key: str) -> str:
    """'unet' (the denoiser), 'text_encoder', 'text_encoder_2' or 'other' for a module key."""
    for prefix, name in _COMPONENTS:
        if key.startswith(prefix):
            return name
    return "other"


def guess_family(lora: LoraFile) -> tuple[str, str]:
    """(family, how it was guessed): from metadata if present, else from names and shapes."""
    for field in ("ss_base_model_version", "modelspec.architecture"):
        value = lora.metadata.get(field, "").lower()
        for needle, family in _META_FAMILIES:
            if needle in value:
                return family, f"metadata {field}={lora.metadata[field]}"
    keys = list(lora.modules)
    if any(_FLUX.search(k) for k in keys):
        return "flux", "Flux block names"
    if any(_WAN.search(k) for k in keys) and not any("transformer_blocks" in k for k in keys):
        return "wan", "Wan block names"
    if any(_QWEN.search(k) for k in keys):
        return "qwen-image", "Qwen-Image block names (img_mlp / txt_mlp / img_mod / txt_mod)"
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoders.clip_g.", "text_encoder_2.")) for k in keys):
        return "sdxl", "second text encoder"
    widths = Counter(m.in_features for k, m in lora.modules.items() if _CROSS_KV.search(k) and not m.is_conv)
    for width, _ in widths.most_common():
        if width in _CROSS_ATTN_WIDTH:
            return _CROSS_ATTN_WIDTH[width], f"cross-attention k/v input width {width}"
    if any(_SGM.search(k) for k in keys):
        return "sdxl", "kohya SGM block names"
    return "unknown", "no metadata and no telling names or shapes"


def _sort_alphas(alphas: set) -> list:
    return sorted(a for a in alphas if a is not None) + ([None] if None in alphas else [])


def summarize(lora: LoraFile) -> dict:
    """Facts about a LoRA: format, family guess, module counts per component, ranks, alphas, ..."""
    family, how = guess_family(lora)
    counts = {"unet": 0, "text_encoder": 0, "text_encoder_2": 0, "other": 0}
    for key in lora.modules:
        counts[component_of(key)] += 1
    mods = list(lora.modules.values())
    return {
        "path": str(lora.path) if lora.path is not None else None,
        "format": lora.format,
        "family": family,
        "family_source": how,
        "modules": len(mods),
        "components": counts,
        "ranks": sorted({m.rank for m in mods}),
        "alphas": _sort_alphas({m.alpha for m in mods}),
        "conv_modules": sum(m.is_conv for m in mods),
        "dtype": str(lora.dtype).removeprefix("torch."),
        "metadata": dict(lora.metadata),
        "dropped": dict(lora.dropped),
    }
