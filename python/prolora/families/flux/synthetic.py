"""Synthetic FLUX.1 and Chroma models and LoRAs: the presets and their sizes (FluxConfig), the
parameter list of diffusers' FluxTransformer2DModel / ChromaTransformer2DModel, the BFL single
file and the sharded diffusers folder, and LoRAs in every Flux format.

BFL files fuse what diffusers keeps apart (q, k, v [and the single blocks' mlp] concatenated, the
final modulation's halves swapped); the plan of which diffusers parameters make which BFL key is
the reader's own (keys.bfl_file_plan), so a synthetic file is read back by the same map that reads
real ones. The diffusers folder shards transformer/ like `save_pretrained` does.

What prolora.synthetic asks of this part (no family named there): `PRESETS` and `preset(name,
scale)` (a preset name -> a FluxConfig); a config's `layouts`, `derived_from`, `params()` and
`write(...)` (write_model); `write_lora_modules(...)` (write_lora); `EXPORTS` (the names
prolora.synthetic re-exports) and `CONFORMANCE` (tests/families/test_conformance.py).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ...checkpoints.model import BaseModel
from ...lora import LoraModule
from ...synthetic.conformance import Conformance
from ...synthetic.loras import check_targets, chosen, format_spelling, fused_pairs
from ...synthetic.params import ParamList, Params
from ...synthetic.values import Values
from ...synthetic.writing import write_tensors, write_transformer_folder
from .chroma import CHROMA, FLUX
from .keys import COMPONENT, bfl_file_plan

# the names prolora.synthetic re-exports from this part (imported on first use there)
EXPORTS = ("FLUX_PRESETS", "FLUX_SCALES", "FluxConfig", "flux_config", "flux_lora_targets", "flux_params")


@dataclass(frozen=True)
class FluxConfig:
    """A Flux transformer: diffusers' FluxTransformer2DModel config fields (FLUX.1 at full size:
    19 double + 38 single blocks, 24 heads of 128, MLP ratio 4 as in diffusers). guidance_embeds:
    FLUX.1-dev has the guidance embedder, schnell does not."""

    family: str = FLUX
    num_layers: int = 19
    num_single_layers: int = 38
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    in_channels: int = 64
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    # Chroma (family "chroma"): no modulation linears and no time/text/guidance embedders; instead
    # the modulation approximator `distilled_guidance_layer` (in channels, hidden width, layers)
    approximator: tuple[int, int, int] | None = None

    # write_model's layouts: a diffusers folder, BFL keys bare or under ComfyUI's prefix
    layouts = ("diffusers", "single-file", "single-file-prefixed")

    @property
    def hidden(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def derived_from(self) -> tuple[str, ...]:
        """Members a target of this config may be derived from (weights both have perturbed, the
        rest drawn fresh): Chroma from FLUX.1(-schnell)."""
        return (FLUX,) if self.family == CHROMA else ()

    def diffusers_config(self) -> dict:
        """config.json of the transformer folder (what FluxTransformer2DModel(**...) or, for
        Chroma, ChromaTransformer2DModel(**...) takes)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("family", "approximator")}
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        if self.approximator is not None:
            for k in ("pooled_projection_dim", "guidance_embeds"):
                d.pop(k)
            d.update(approximator_num_channels=self.approximator[0], approximator_hidden_dim=self.approximator[1],
                     approximator_layers=self.approximator[2])
            return {"_class_name": "ChromaTransformer2DModel", "_diffusers_version": "0.35.0", "patch_size": 1,
                    "out_channels": None, **d}
        return {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0", "patch_size": 1,
                "out_channels": None, **d}

    def params(self) -> dict[str, Params]:
        """{component: params} (write_model's model_params)."""
        return {COMPONENT: flux_params(self)}

    def write(self, path: Path, params: dict[str, Params], layout: str, values: Values, dtype: torch.dtype,
              meta: dict[str, str], shard_bytes: int) -> None:
        write_flux(path, self, params[COMPONENT], layout, values, dtype, meta, shard_bytes)


FLUX_PRESETS: dict[str, FluxConfig] = {
    "flux-dev": FluxConfig(), "flux-schnell": FluxConfig(guidance_embeds=False),
    # Chroma (from FLUX.1-schnell): diffusers' ChromaTransformer2DModel defaults
    "chroma": FluxConfig(family=CHROMA, guidance_embeds=False, approximator=(64, 5120, 5)),
}
PRESETS = FLUX_PRESETS
# scale -> (double blocks, single blocks, heads, head dim, in channels, joint dim, pooled dim, rope axes)
FLUX_SCALES = {
    "full": None,
    "small": (5, 10, 6, 64, 64, 512, 128, (8, 28, 28)),
    "tiny": (2, 4, 2, 16, 16, 32, 32, (4, 6, 6)),
}


def flux_config(name: str = "flux-dev", scale: str = "full", blocks: tuple[int, int] | None = None) -> FluxConfig:
    """A Flux preset ("flux-dev", "flux-schnell", "chroma") at "full", "small" (h=384) or "tiny" (h=32)
    width, optionally with `blocks` = (double, single) blocks instead of the scale's."""
    if name not in FLUX_PRESETS:
        raise ValueError(f"unknown Flux preset {name!r}; choose one of {sorted(FLUX_PRESETS)}")
    if scale not in FLUX_SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(FLUX_SCALES)}")
    cfg = FLUX_PRESETS[name]
    if FLUX_SCALES[scale] is not None:
        d, s_, heads, hd, cin, joint, pooled, axes = FLUX_SCALES[scale]
        cfg = replace(cfg, num_layers=d, num_single_layers=s_, num_attention_heads=heads, attention_head_dim=hd,
                      in_channels=cin, joint_attention_dim=joint, pooled_projection_dim=pooled, axes_dims_rope=axes)
        if cfg.approximator is not None:  # Chroma's approximator is 5/3 of the width wide
            cfg = replace(cfg, approximator=(cin, heads * hd * 5 // 3, cfg.approximator[2]))
    if blocks is not None:
        cfg = replace(cfg, num_layers=int(blocks[0]), num_single_layers=int(blocks[1]))
    return cfg


def preset(name: str, scale: str = "full") -> FluxConfig:
    """prolora.synthetic.preset's hook: a preset of PRESETS at a scale of FLUX_SCALES."""
    return flux_config(name, scale)


# ----------------------------------------------------------------------------- parameters


def flux_params(cfg: FluxConfig) -> Params:
    """(diffusers name, shape) of every FluxTransformer2DModel (or, for a Chroma config,
    ChromaTransformer2DModel) parameter, in state_dict order."""
    h = cfg.hidden
    mlp = 4 * h
    hd = cfg.attention_head_dim
    chroma = cfg.approximator is not None  # no modulation linears, no embedders: the approximator
    p = ParamList()
    if chroma:
        cin, width, layers = cfg.approximator
        p.linear("distilled_guidance_layer.in_proj", width, cin)
        for i in range(layers):
            p.linear(f"distilled_guidance_layer.layers.{i}.linear_1", width, width)
            p.linear(f"distilled_guidance_layer.layers.{i}.linear_2", width, width)
        p += [(f"distilled_guidance_layer.norms.{i}.weight", (width,)) for i in range(layers)]
        p.linear("distilled_guidance_layer.out_proj", h, width)
    else:
        p.linear("time_text_embed.timestep_embedder.linear_1", h, 256)
        p.linear("time_text_embed.timestep_embedder.linear_2", h, h)
        if cfg.guidance_embeds:
            p.linear("time_text_embed.guidance_embedder.linear_1", h, 256)
            p.linear("time_text_embed.guidance_embedder.linear_2", h, h)
        p.linear("time_text_embed.text_embedder.linear_1", h, cfg.pooled_projection_dim)
        p.linear("time_text_embed.text_embedder.linear_2", h, h)
    p.linear("context_embedder", h, cfg.joint_attention_dim)
    p.linear("x_embedder", h, cfg.in_channels)
    for i in range(cfg.num_layers):
        b = f"transformer_blocks.{i}"
        if not chroma:
            p.linear(f"{b}.norm1.linear", 6 * h, h)
            p.linear(f"{b}.norm1_context.linear", 6 * h, h)
        p += [(f"{b}.attn.norm_q.weight", (hd,)), (f"{b}.attn.norm_k.weight", (hd,))]
        for x in ("to_q", "to_k", "to_v", "to_out.0"):
            p.linear(f"{b}.attn.{x}", h, h)
        p += [(f"{b}.attn.norm_added_q.weight", (hd,)), (f"{b}.attn.norm_added_k.weight", (hd,))]
        for x in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            p.linear(f"{b}.attn.{x}", h, h)
        for ff in ("ff", "ff_context"):
            p.linear(f"{b}.{ff}.net.0.proj", mlp, h)
            p.linear(f"{b}.{ff}.net.2", h, mlp)
    for i in range(cfg.num_single_layers):
        b = f"single_transformer_blocks.{i}"
        if not chroma:
            p.linear(f"{b}.norm.linear", 3 * h, h)
        p.linear(f"{b}.proj_mlp", mlp, h)
        p.linear(f"{b}.proj_out", h, h + mlp)
        p += [(f"{b}.attn.norm_q.weight", (hd,)), (f"{b}.attn.norm_k.weight", (hd,))]
        for x in ("to_q", "to_k", "to_v"):
            p.linear(f"{b}.attn.{x}", h, h)
    if not chroma:
        p.linear("norm_out.linear", 2 * h, h)
    p.linear("proj_out", cfg.in_channels, h)
    return list(p)


# ----------------------------------------------------------------------------- models on disk


def write_flux(path: Path, cfg: FluxConfig, params: Params, layout: str, values: Values, dtype: torch.dtype,
               meta: dict[str, str], shard_bytes: int) -> None:
    """Write a Flux model at `path`: "single-file" (BFL keys), "single-file-prefixed" (BFL keys
    under ComfyUI's `model.diffusion_model.`) or "diffusers" (transformer/ in shards of at most
    `shard_bytes`, with an index when there is more than one)."""
    if layout.startswith("single-file"):
        _write_bfl(path, params, "model.diffusion_model." if layout == "single-file-prefixed" else "", values, dtype,
                   meta)
    else:
        write_transformer_folder(path, cfg, params, values, dtype, meta, shard_bytes, index={
            "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0",
            "transformer": ["diffusers", "FluxTransformer2DModel"]})


def _write_bfl(path: Path, params: Params, prefix: str, values: Values, dtype: torch.dtype,
               meta: dict[str, str]) -> None:
    shapes = dict(params)
    items = []
    for e in bfl_file_plan(params, prefix):
        def make(e=e):
            parts = [values(COMPONENT, n, shapes[n]) for n in e.sources]
            t = torch.cat(parts) if len(parts) > 1 else parts[0]
            if e.swap:
                a, b = t.chunk(2)
                t = torch.cat([b, a])
            return t
        items.append((e.key, e.shape, make))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(path, items, dtype, meta)


# ----------------------------------------------------------------------------- LoRAs

# write_lora's format -> spelling (kohya: the model's kohya spelling, BFL names)
_SPELLING = {"peft": "peft", "comfy": "comfy", "xlabs": "xlabs"}


def flux_lora_targets(modules: Iterable[str], targets: str = "transformer") -> Iterator[str]:
    """Canonical Flux transformer ids a LoRA of this kind adapts (see prolora.synthetic.write_lora)."""
    check_targets(targets)
    for module in modules:
        if not module.startswith(f"{COMPONENT}."):
            continue
        in_block = module.startswith((f"{COMPONENT}.transformer_blocks.", f"{COMPONENT}.single_transformer_blocks."))
        if chosen(targets, attn=".attn." in module, transformer=in_block):
            yield module


def write_lora_modules(m: BaseModel, format: str, rank: int, alpha: float, targets: str, seed: int, size: float,
                       split_qkv: bool = False, spelling: str | None = None,
                       **_ignored: object) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """prolora.synthetic.write_lora's hook: (modules, the family's metadata). One pair per key the
    format spells: a fused BFL key (q, k, v [, mlp]) gets one down and an up whose row blocks are
    the slices' (block-diagonal under split_qkv)."""
    spelling = format_spelling(format, spelling or (m.kohya_spelling if format == "kohya" else None), _SPELLING,
                               "Flux")
    mods = fused_pairs(m, flux_lora_targets(m.weights, targets), spelling, rank, alpha, seed, size, split_qkv)
    return mods, {"ss_base_model_version": "flux1"}


# ----------------------------------------------------------------------------- conformance

_LINEAR1 = "its kohya / ComfyUI converter splits single_blocks.*.linear1 at FLUX.1's widths only (assert)"
# `prolora bench`: (source preset, target preset) of each bench preset (Chroma is derived from
# FLUX.1-schnell), and what its LoRAs adapt: attention, MLP and output projections of every double
# and single block (what Flux LoRA trainers adapt by default), as PEFT (split q/k/v, as ai-toolkit
# and diffusers write them); q, k, v and the MLP input are row slices of BFL's fused weights
BENCH_PAIRS = {"flux": ("flux-dev", "flux-dev"), "chroma": ("flux-schnell", "chroma")}
BENCH_LORA = ("peft", re.compile(r"^transformer\.(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|add_q_proj|"
                                 r"add_k_proj|add_v_proj|to_out\.0|to_add_out)|ff(_context)?\.net\.(0\.proj|2))|"
                                 r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))$"))


def bench_pair(name: str, width: float, depth: float) -> tuple[FluxConfig, FluxConfig]:
    """(source, target) configs of bench preset `name`: width 1 is the real 3072, anything less
    the small preset (384); depth scales both block counts."""
    scale = "full" if width >= 1.0 else "small"

    def at_depth(preset_name: str) -> FluxConfig:
        base = flux_config(preset_name, scale)
        return flux_config(preset_name, scale, blocks=(max(1, round(base.num_layers * depth)),
                                                       max(1, round(base.num_single_layers * depth))))
    src, tgt = BENCH_PAIRS[name]
    return at_depth(src), at_depth(tgt)


CONFORMANCE = Conformance(
    pairs=(("flux-dev:tiny", "flux-dev:tiny"), ("flux-schnell:tiny", "chroma:tiny")),
    layouts=("diffusers", "single-file", "single-file-prefixed"),
    loras={"kohya": {"format": "kohya"},  # BFL names, fused qkv / linear1 (kohya sd-scripts, ComfyUI-trained)
           "kohya-split": {"format": "kohya", "split_qkv": True},  # kohya's split_qkv form of the fused keys
           "kohya-diffusers": {"format": "kohya", "spelling": "kohya-diffusers"},  # lora_transformer_ (SimpleTuner)
           "comfy": {"format": "comfy"}, "xlabs": {"format": "xlabs"},
           "peft": {"format": "peft"}},  # diffusers, ai-toolkit
    component="transformer",
    model_classes={FLUX: "FluxTransformer2DModel", CHROMA: "ChromaTransformer2DModel"},
    pipelines={FLUX: "FluxPipeline", CHROMA: "ChromaPipeline"},
    dtype="bfloat16",
    # diffusers 0.42's Flux loader (lora_conversion_utils):
    loader_gaps={
        # _convert_kohya_flux_lora_to_diffusers splits single_blocks.N.linear1 (q, k, v, mlp) at
        # FLUX.1's own widths (3 x 3072 + 12288): at any other width it fails an assert
        "kohya": _LINEAR1, "kohya-split": _LINEAR1, "comfy": _LINEAR1,
        # lora_transformer_<flat diffusers path> outside attention is mapped onto the block itself
        # (e.g. single_transformer_blocks.0 for ...proj_mlp): KeyError 'single_transformer_blocks.0.weight'
        "kohya-diffusers": "lora_transformer_ names outside attention are mapped onto the block itself (KeyError)",
    },
)
