"""Deterministic synthetic base models and LoRAs in real layouts (no diffusers needed).

Used by `prolora demo`, the benchmarks and the tests. Parameter names and shapes follow diffusers'
UNet2DConditionModel / FluxTransformer2DModel and transformers' CLIP text encoders exactly
(checked against them in tests/test_synthetic.py and tests/test_flux.py); weights get spectra like
trained ones, and a TARGET model is a source plus a fine-tune-like perturbation.

    configs   presets ("sdxl", "sd15:tiny", "flux-dev:small", ...) and their sizes
    params    the (name, shape) of every parameter, in state_dict order
    spectra   seeded generators and trained-like spectral weights
    values    each parameter's value: a source's, or source + perturbation
    models    write_model: SD-family pipeline folders and single files; other families' configs
              write themselves
    loras     write_lora in every format, keys spelled through the model
    demo      write_pair (source + target) and make_demo
    writing   tensors streamed to .safetensors one at a time, sharded transformer folders

The FLUX.1 / Chroma, Qwen-Image and Wan writers live in their families' packages
(prolora.families.flux.synthetic, .qwen_image.synthetic, .wan.synthetic); their names here import
them on first use.
"""
from __future__ import annotations

from .configs import PRESETS, SCALES, ConfigLike, ModelConfig, TextEncoderConfig, preset, resolve, shrink
from .demo import make_demo, write_pair
from .loras import lora_targets, write_lora
from .models import write_model
from .params import Params, clip_params, model_params, unet_params
from .spectra import generator, spectral_weight, spectrum
from .values import Perturbation, perturb, source_tensor

__all__ = [
    "FLUX_PRESETS", "FLUX_SCALES", "PRESETS", "SCALES", "ConfigLike", "FluxConfig", "ModelConfig", "Params",
    "Perturbation", "TextEncoderConfig", "clip_params", "flux_config", "flux_lora_targets", "flux_params",
    "generator", "lora_targets", "make_demo", "model_params", "perturb", "preset", "resolve", "shrink",
    "source_tensor", "spectral_weight", "spectrum", "unet_params", "write_lora", "write_model", "write_pair",
    "QwenConfig", "qwen_config", "qwen_params", "write_qwen_lora", "write_qwen_model",
    "WanConfig", "wan_config", "wan_params", "write_wan22_experts", "write_wan_lora", "write_wan_model",
]

# the family writers live in their family's package (prolora.families.<f>.synthetic) and are
# imported on first use; their names stay importable from here
_LAZY = {
    "prolora.families.flux.synthetic": ("FLUX_PRESETS", "FLUX_SCALES", "FluxConfig", "flux_config",
                                        "flux_lora_targets", "flux_params"),
    "prolora.families.qwen_image.synthetic": ("QwenConfig", "qwen_config", "qwen_params", "write_qwen_lora",
                                              "write_qwen_model"),
    "prolora.families.wan.synthetic": ("WanConfig", "wan_config", "wan_params", "write_wan22_experts", "write_wan_lora",
                                       "write_wan_model"),
}


def __getattr__(name: str):
    import importlib

    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
