"""Synthetic SD-family models and LoRAs: the presets (SD1.5, SD2, SDXL, SSD-1B) and their shrunken
sizes, the diffusers pipeline folder and the LDM/SGM single file, and LoRAs in every SD format.

A ModelConfig is a diffusers UNet2DConditionModel config plus its CLIP text encoders
(prolora.synthetic.encoders); its parameter lists are synthetic_params' and the encoders'. The
single file is laid out by the reader's own map (read.single_file_plan), so a synthetic file is
read back by the same map that reads real ones.

What prolora.synthetic asks of this part (no family named there): `PRESETS`, `preset(name,
scale)`, `DEFAULT_PRESET`; a config's `layouts`, `derived_from`, `params()` and `write(...)`
(write_model); `write_lora_modules(...)` (write_lora); `EXPORTS` (the names prolora.synthetic
re-exports) and `CONFORMANCE` (tests/families/test_conformance.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ...checkpoints import BaseModel, WeightRef
from ...lora import LoraModule
from ...synthetic.conformance import Conformance
from ...synthetic.encoders import TextEncoderConfig, clip_config_json, clip_params
from ...synthetic.loras import check_targets, chosen, spelled_pairs
from ...synthetic.params import Params
from ...synthetic.values import Values
from ...synthetic.writing import WEIGHTS, write_tensors
from .read import single_file_plan
from .synthetic_params import UNET_DEFAULTS, unet_params

# the names prolora.synthetic re-exports from this part (imported on first use there)
EXPORTS = ("PRESETS", "SCALES", "ModelConfig", "shrink", "unet_params", "lora_targets", "UNET_DEFAULTS")
DEFAULT_PRESET = "sdxl:tiny"  # write_model's, write_pair's and `prolora demo`'s model when given none


@dataclass(frozen=True)
class ModelConfig:
    """A whole base model: a UNet2DConditionModel config and its text encoders."""

    family: str
    unet: dict
    text_encoders: dict[str, TextEncoderConfig] = field(default_factory=dict)

    # write_model's layouts: a diffusers pipeline folder, one LDM/SGM file
    layouts = ("diffusers", "single-file")
    derived_from = ()  # none: every weight of a target is its base's (an SSD-1B target of an SDXL base: a subset)

    def params(self) -> dict[str, Params]:
        """{component: params}: the UNet and every text encoder (write_model's model_params)."""
        out = {"unet": unet_params(self.unet)}
        out.update({name: clip_params(te) for name, te in self.text_encoders.items()})
        return out

    def write(self, path: Path, params: dict[str, Params], layout: str, values: Values, dtype: torch.dtype,
              meta: dict[str, str], shard_bytes: int) -> None:
        if layout == "single-file":
            _write_single_file(path, self, params, values, dtype, meta)
        else:
            _write_folder(path, self, params, values, dtype, meta)


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


def preset(name: str, scale: str = "full") -> ModelConfig:
    """prolora.synthetic.preset's hook: "sd15", "sd2", "sdxl" or "ssd-1b" at "full", "small" or
    "tiny" size (SCALES: width and depth factors for shrink)."""
    if name not in PRESETS:
        raise ValueError(f"unknown SD preset {name!r}; choose one of {sorted(PRESETS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    return shrink(PRESETS[name], *SCALES[scale])


# ----------------------------------------------------------------------------- models on disk


def _write_single_file(path: Path, cfg: ModelConfig, params: dict[str, Params], values: Values, dtype: torch.dtype,
                       meta: dict[str, str]) -> None:
    """One file with LDM/SGM keys, laid out by the reader's own map (single_file_plan)."""
    te1 = cfg.text_encoders.get("text_encoder")
    shapes = {c: dict(plist) for c, plist in params.items()}
    items = []
    for e in single_file_plan(params, openclip_te1=te1 is not None and te1.openclip):
        def make(e=e):
            parts = [values(c, n, shapes[c][n]) for c, n in e.sources]
            t = torch.cat(parts) if len(parts) > 1 else parts[0]
            return t.t() if e.transpose else t
        items.append((e.key, e.shape, make))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(path, items, dtype, meta)


def _write_folder(path: Path, cfg: ModelConfig, params: dict[str, Params], values: Values, dtype: torch.dtype,
                  meta: dict[str, str]) -> None:
    """A diffusers pipeline folder: model_index.json and one folder (config.json + weights) per component."""
    path.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionXLPipeline" if "text_encoder_2" in params else "StableDiffusionPipeline",
             "_diffusers_version": "0.30.0", "unet": ["diffusers", "UNet2DConditionModel"]}
    for comp, plist in params.items():
        folder = path / comp
        folder.mkdir(exist_ok=True)
        if comp == "unet":
            conf, fname = _unet_config_json(cfg), f"{WEIGHTS}.safetensors"
        else:
            te = cfg.text_encoders[comp]
            conf, fname = clip_config_json(te, dtype), "model.safetensors"
            index[comp] = ["transformers", conf["architectures"][0]]
        (folder / "config.json").write_text(json.dumps(conf, indent=2))
        items = [(n, s, (lambda c=comp, n=n, s=s: values(c, n, s))) for n, s in plist]
        write_tensors(folder / fname, items, dtype, meta)
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


def _unet_config_json(cfg: ModelConfig) -> dict:
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0", **UNET_DEFAULTS, **cfg.unet}


# ----------------------------------------------------------------------------- LoRAs

_ATTN = (".attn1.", ".attn2.", ".self_attn.")
# write_lora's format -> spelling (kohya: the model's own kohya spelling, set per member)
_SPELLING = {"peft": "peft", "diffusers-old": "peft", "comfy": "comfy"}


def lora_targets(modules: dict[str, WeightRef], targets: str = "transformer", conv: bool = False):
    """Canonical module ids a LoRA of this kind adapts (text_projection never).

    "attn": attention projections (UNet attn1/attn2, text-encoder self_attn);
    "transformer": every linear (and 1x1 conv) in UNet transformers plus all text-encoder layer
    linears, like kohya's defaults; "all": also resnets, time embeddings, samplers, conv_in/out
    (3x3 convs only with conv=True).
    """
    check_targets(targets)
    for module, ref in modules.items():
        if module.endswith("text_projection"):
            continue
        is_te = not module.startswith("unet.")
        k3 = len(ref.shape) == 4 and ref.shape[2:] != (1, 1)
        if k3 and not conv:
            continue
        if chosen(targets, attn=any(a in module for a in _ATTN), transformer=is_te or ".attentions." in module):
            yield module


def write_lora_modules(m: BaseModel, format: str, rank: int, alpha: float, targets: str, seed: int, size: float,
                       conv: bool = False, spelling: str | None = None,
                       **_ignored: object) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """prolora.synthetic.write_lora's hook: one (down, up) pair per adapted UNet / text-encoder
    module (convs: a kxk down, a 1x1 up), spelled for `format` (or `spelling`: kohya-ldm,
    kohya-diffusers, peft, comfy); no family metadata."""
    spelling = spelling or (m.kohya_spelling if format == "kohya" else _SPELLING.get(format))
    if spelling is None:
        raise ValueError(f"unknown format {format!r}")
    return spelled_pairs(m, lora_targets(m.weights, targets, conv), spelling, rank, alpha, seed, size), {}


# ----------------------------------------------------------------------------- conformance

# `prolora bench`: the pair a bench preset builds at a width / depth scale, and what its LoRAs adapt
# (kohya, as kohya's own scripts write SD LoRAs: every transformer-block linear)
BENCH_LORA = ("kohya", re.compile(r"^unet\..*transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|"
                                  r"ff\.net\.(0\.proj|2))$"))


def bench_pair(name: str, width: float, depth: float) -> tuple[ModelConfig, ModelConfig]:
    """(source, target) configs of bench preset `name`: the same SD config (the target is written
    as a perturbed copy of the source)."""
    cfg = shrink(preset(name), width, depth)
    return cfg, cfg


_XL = "StableDiffusionXLPipeline"
CONFORMANCE = Conformance(
    pairs=(("sdxl:tiny", "sdxl:tiny"), ("sd15:tiny", "sd15:tiny")),
    layouts=("diffusers", "single-file"),
    # kohya's scripts write SGM names for SDXL (kohya-ldm) and diffusers names for SD1.x (kohya-diffusers)
    loras={"kohya-ldm": {"format": "kohya", "spelling": "kohya-ldm"},
           "kohya-diffusers": {"format": "kohya", "spelling": "kohya-diffusers"},
           "peft": {"format": "peft"}, "comfy": {"format": "comfy"}, "diffusers-old": {"format": "diffusers-old"}},
    component="unet",
    model_classes={m: "UNet2DConditionModel" for m in ("sd1", "sd2", "sdxl", "ssd-1b", "vega", "koala")},
    pipelines={"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": _XL, "ssd-1b": _XL,
               "vega": _XL, "koala": _XL},
    # diffusers 0.42's SD loader (lora_state_dict / _convert_non_diffusers_lora_to_diffusers):
    loader_gaps={
        # ComfyUI's `diffusion_model.<LDM name>` keys have no converter: none is loaded, without a word
        "comfy": "no converter for ComfyUI's diffusion_model.* UNet keys (it loads none of them, silently)",
        # it maps kohya's LDM block names (lora_unet_input_blocks_*) only for SDXL-shaped UNets
        # (_maybe_map_sgm_blocks_to_diffusers); on SD1.x the names stay LDM ones peft cannot find
        "kohya-ldm@sd1": "kohya LDM block names are mapped for SDXL UNets only (NoMatchingPeftModuleError on SD1.x)",
    },
)
