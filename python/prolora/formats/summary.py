"""summarize(): the facts `prolora inspect` shows about a LoRA file."""
from __future__ import annotations

from collections import Counter

from ..families import guess_lora
from ..lora import LoraFile

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
    """(family, how it was guessed): from metadata if present, else from names and shapes, by
    each registered family's hints (families.guess_lora)."""
    return guess_lora(lora)


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
        **_adapters(mods),
    }


def _adapters(mods) -> dict:
    """{"adapters": {kind: modules}, "max_compression_error": ...} when any module was not a plain LoRA."""
    kinds = Counter(m.kind for m in mods if m.kind != "lora")
    if not kinds:
        return {}
    return {"adapters": dict(kinds), "max_compression_error": max((m.error or 0.0) for m in mods)}
