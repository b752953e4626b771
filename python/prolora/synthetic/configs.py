"""Model configurations: the SD-family presets, their shrunken sizes, and name lookup (the other
families' presets are their synthetic parts', prolora.families.<f>.synthetic).

A ModelConfig is a diffusers UNet2DConditionModel config plus its CLIP text encoders; a family
part's config (e.g. FluxConfig) knows its own parameters and writer. `preset("sdxl", "tiny")` or
`resolve("sdxl:tiny")` gives the configuration every other synthetic module builds from.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, Union


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text encoder (transformers CLIPTextModel[WithProjection] shapes)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    vocab: int = 49408
    max_positions: int = 77
    projection: int | None = None  # CLIPTextModelWithProjection's text_projection width
    openclip: bool = False  # stored OpenCLIP-style (fused q/k/v) in single files
    act: str = "quick_gelu"


@dataclass(frozen=True)
class ModelConfig:
    """A whole base model: a UNet2DConditionModel config and its text encoders."""

    family: str
    unet: dict
    text_encoders: dict[str, TextEncoderConfig] = field(default_factory=dict)


_SDXL_UNET = dict(
    sample_size=128, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[320, 640, 1280],
    layers_per_block=2, attention_head_dim=[5, 10, 20], cross_attention_dim=2048, transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
_CLIP_L = TextEncoderConfig(hidden=768, layers=12, intermediate=3072, heads=12)
_CLIP_G = TextEncoderConfig(hidden=1280, layers=32, intermediate=5120, heads=20, projection=1280, openclip=True, act="gelu")

PRESETS: dict[str, ModelConfig] = {
    "sd15": ModelConfig("sd1", dict(sample_size=64, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
                                    attention_head_dim=8), {"text_encoder": _CLIP_L}),
    "sd2": ModelConfig("sd2", dict(sample_size=96, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=1024,
                                   attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
                       {"text_encoder": TextEncoderConfig(hidden=1024, layers=23, intermediate=4096, heads=16,
                                                          openclip=True, act="gelu")}),
    "sdxl": ModelConfig("sdxl", _SDXL_UNET, {"text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G}),
    "ssd-1b": ModelConfig("ssd-1b", dict(_SDXL_UNET, transformer_layers_per_block=[1, 2, 4],
                                         reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], [1, 1, 1]],
                                         mid_block_type="UNetMidBlock2D"),
                          {"text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G}),
}
SCALES = {"full": (1.0, 1.0), "small": (0.25, 0.5), "tiny": (0.1, 0.2)}  # (width, depth)


def _round32(x: float) -> int:
    return max(32, 32 * round(x / 32))


def shrink(cfg: ModelConfig, width: float = 1.0, depth: float = 1.0) -> ModelConfig:
    """The same structure with fewer channels and transformer blocks.

    Channels are scaled by `width` (multiples of 32, so group norms still divide), transformer
    depths and text-encoder layers by `depth` (at least 1, so no block disappears and uneven
    depths such as SSD-1B's stay uneven). Levels, resnets per level and block types are kept.
    """
    if width == 1.0 and depth == 1.0:
        return cfg
    d = lambda n: max(1, round(n * depth))  # noqa: E731
    tes = {}
    for name, te in cfg.text_encoders.items():
        h = _round32(te.hidden * width)
        tes[name] = replace(te, hidden=h, layers=d(te.layers), intermediate=4 * h, heads=max(1, h // 32),
                            vocab=min(te.vocab, 1000), projection=h if te.projection else None)
    u = dict(cfg.unet)
    chans = [_round32(c * width) for c in u["block_out_channels"]]
    u["block_out_channels"] = chans
    u["attention_head_dim"] = [max(1, c // 32) for c in chans]
    deep = lambda v: [deep(x) for x in v] if isinstance(v, list) else d(v)  # noqa: E731
    for k in ("transformer_layers_per_block", "reverse_transformer_layers_per_block"):
        if isinstance(u.get(k), (list, int)):
            u[k] = deep(u[k])
    if tes:
        u["cross_attention_dim"] = sum(te.hidden for te in tes.values())
    if u.get("addition_embed_type") == "text_time":
        t = max(8, _round32(u["addition_time_embed_dim"] * width) // 4)
        u["addition_time_embed_dim"] = t
        u["projection_class_embeddings_input_dim"] = 6 * t + tes["text_encoder_2"].projection
    u["sample_size"] = 32
    return ModelConfig(cfg.family, u, tes)


def preset(name: str, scale: str = "full") -> "ModelConfig | Any":
    """A named configuration ("sd15", "sd2", "sdxl", "ssd-1b", or a preset of a family's synthetic
    part: "flux-dev", "flux-schnell", "chroma", ...) at "full", "small" or "tiny" size."""
    if name not in PRESETS:
        for part in synthetic_parts():
            if name in getattr(part, "PRESETS", {}):
                return part.preset(name, scale)
        others = [n for part in synthetic_parts() for n in sorted(getattr(part, "PRESETS", {}))]
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS) + others}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    return shrink(PRESETS[name], *SCALES[scale])


def synthetic_parts() -> list[ModuleType]:
    """The "synthetic" parts of the registered families (prolora.families.<f>.synthetic) that
    exist, in registry order. A part offers presets through `PRESETS` and `preset(name, scale)`."""
    from .. import families

    return [fam.part("synthetic") for fam in families.families()
            if fam.has("synthetic") and importlib.util.find_spec(fam.parts["synthetic"]) is not None]


# UNet2DConditionModel's defaults for every key that shapes a parameter (a preset's `unet` dict
# overrides them; unet_params reads the merged dict, and config.json holds it)
UNET_DEFAULTS = dict(
    in_channels=4, out_channels=4, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn", up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=1280,
    transformer_layers_per_block=1, reverse_transformer_layers_per_block=None, attention_head_dim=8,
    num_attention_heads=None, use_linear_projection=False, addition_embed_type=None, addition_time_embed_dim=None,
    projection_class_embeddings_input_dim=None, time_embedding_dim=None, conv_in_kernel=3, conv_out_kernel=3,
)

# a config (a ModelConfig, or a family part's config such as FluxConfig), or a preset name with an
# optional ":scale"
ConfigLike = Union[ModelConfig, Any, str]


def resolve(cfg: ConfigLike) -> "ModelConfig | Any":
    """A config as given, or the preset a name such as "sdxl", "sd15:tiny" or "flux-dev:small" names."""
    if not isinstance(cfg, str):
        return cfg
    name, _, scale = cfg.partition(":")
    return preset(name, scale or "full")
