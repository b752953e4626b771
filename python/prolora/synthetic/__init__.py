"""Deterministic synthetic base models and LoRAs in real layouts (no diffusers needed).

Used by `prolora demo`, the benchmarks and the tests. Parameter names and shapes follow the
families' diffusers / transformers classes exactly (checked against them in the tests); weights get
spectra like trained ones, and a TARGET model is a source plus a fine-tune-like perturbation.

This package is family-agnostic; each family's synthetic part (`prolora.families.<f>.synthetic`,
named by `Family.parts["synthetic"]`) holds its presets, parameter lists, layouts and LoRA writer.

    configs      preset lookup over the families' parts ("sdxl", "sd15:tiny", "flux-dev:small", ...)
                 and what a family config offers
    params       parameter lists ((name, shape) in state_dict order) and their helpers
    encoders     CLIP text encoders (config, parameters, config.json)
    spectra      seeded generators and trained-like spectral weights
    values       each parameter's value: a source's, or source + perturbation
    models       write_model: any family config writes itself, in its layouts
    loras        write_lora: the family part's modules, written in any format
    demo         write_pair (source + target) and make_demo
    writing      tensors streamed to .safetensors one at a time, sharded transformer folders
    conformance  what a family's part tells the conformance suite

The names a family part lists in its `EXPORTS` (e.g. PRESETS, ModelConfig, shrink, unet_params,
flux_config, write_qwen_model, write_wan_lora) are importable from here too, imported on first use.
"""
from __future__ import annotations

from .configs import ConfigLike, default_preset, preset, resolve, synthetic_part, synthetic_parts
from .conformance import Conformance
from .demo import make_demo, write_pair
from .encoders import TextEncoderConfig, clip_params
from .loras import TARGETS, write_lora
from .models import write_model
from .params import ParamList, Params, model_params
from .spectra import generator, spectral_weight, spectrum
from .values import Perturbation, perturb, source_tensor

_OWN = [
    "Conformance", "ConfigLike", "ParamList", "Params", "Perturbation", "TARGETS", "TextEncoderConfig", "clip_params",
    "default_preset", "generator", "make_demo", "model_params", "perturb", "preset", "resolve", "source_tensor",
    "spectral_weight", "spectrum", "synthetic_part", "synthetic_parts", "write_lora", "write_model", "write_pair",
]


def _exports() -> dict[str, object]:
    """name -> the family part that exports it (the first in registry order)."""
    out: dict[str, object] = {}
    for part in synthetic_parts():
        for name in getattr(part, "EXPORTS", ()):
            out.setdefault(name, part)
    return out


def __getattr__(name: str):
    if name == "__all__":
        return _OWN + sorted(_exports())
    part = _exports().get(name) if not name.startswith("__") else None
    if part is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(part, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_exports()))
