"""Synthetic FLUX.2 models and LoRAs: the presets (Flux2Config), the parameter list of diffusers'
Flux2Transformer2DModel, the BFL single file (bare or ComfyUI-prefixed) and the diffusers folder,
LoRAs in every FLUX.2 spelling, the conformance record and the bench pair.

Presets (full size, as BFL's transformer configs): "flux2-klein-4b-base" / "flux2-klein-4b" (width
3072 = 24 heads x 128, 5 double + 20 single blocks, joint 7680 = 3 x Qwen3-4B's 2560),
"flux2-klein-9b-base" / "flux2-klein-9b" (4096, 8 + 24, joint 12288), "flux2-dev" (6144, 8 + 48,
joint 15360, guidance embedder); in 128 channels, SwiGLU MLP ratio 3. A [klein] base and its
distilled model differ only in model_index.json (Flux2KleinPipeline `is_distilled`): a target
written from the base with the distilled preset is the base plus a fine-tune-like perturbation.
Scales: "full", "small" (width 384), "tiny" (width 32).

What prolora.synthetic asks of this part (no family named there): `PRESETS` and `preset(name,
scale)`; a config's `layouts`, `derived_from`, `params()` and `write(...)`; `write_lora_modules`
and `save_lora`; `EXPORTS`; `CONFORMANCE`; and `bench_pair` / `BENCH_LORA` for `prolora bench`.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ...checkpoints.model import BaseModel
from ...lora import LoraModule
from ...synthetic.conformance import Conformance
from ...synthetic.loras import (
    check_targets,
    chosen,
    format_spelling,
    fused_pairs,
    save_lora,  # noqa: F401  (the part's hook: ai-toolkit's lora_A / lora_B keys)
)
from ...synthetic.params import ParamList, Params
from ...synthetic.values import Values
from ...synthetic.writing import write_tensors, write_transformer_folder
from .keys import (
    CLASS,
    COMPONENT,
    DOUBLE_NORMS,
    GLU_SLICES,
    MEMBER,
    SINGLE_NORMS,
    SINGLE_SLICES,
    Structure,
    places,
)

EXPORTS = ("FLUX2_PRESETS", "Flux2Config", "flux2_config", "flux2_params")
LAYOUTS = ("diffusers", "single-file", "single-file-prefixed")


@dataclass(frozen=True)
class Flux2Config:
    """Flux2Transformer2DModel's config fields (defaults: FLUX.2 [klein] 4B) and the pipeline
    written to model_index.json."""

    family: str = MEMBER
    num_layers: int = 5
    num_single_layers: int = 20
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    in_channels: int = 128
    joint_attention_dim: int = 7680
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    guidance_embeds: bool = False
    pipeline: str = "Flux2KleinPipeline"
    is_distilled: bool | None = True  # Flux2KleinPipeline's flag (None: a pipeline without it)

    layouts = LAYOUTS
    derived_from = ()
    dtype = torch.bfloat16
    shard_bytes = 5 * 2**30

    @property
    def hidden(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    def params(self) -> dict[str, Params]:
        return {COMPONENT: flux2_params(self)}

    def diffusers_config(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("family", "pipeline", "is_distilled")}
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return {"_class_name": CLASS, "_diffusers_version": "0.36.0", "patch_size": 1, "out_channels": None,
                "rope_theta": 2000, "eps": 1e-6, **d}

    def write(self, path: Path, params: dict[str, Params], layout: str, values: Values, dtype: torch.dtype,
              meta: dict[str, str], shard_bytes: int) -> None:
        """write_model's hook: BFL keys in one file (bare or under ComfyUI's prefix), or a
        pipeline folder."""
        values = _sliced(values, self)
        if layout.startswith("single-file"):
            prefix = "model.diffusion_model." if layout == "single-file-prefixed" else ""
            _write_bfl(path, self, params[COMPONENT], prefix, values, dtype, meta)
            return
        index = {"_class_name": self.pipeline, "_diffusers_version": "0.36.0", "transformer": ["diffusers", CLASS]}
        if self.is_distilled is not None:
            index["is_distilled"] = self.is_distilled
        write_transformer_folder(path, self, params[COMPONENT], values, dtype, meta, shard_bytes, index=index)


def _sliced(values: Values, cfg: Flux2Config) -> Values:
    """Values in which a TARGET's fused diffusers weights (to_qkv_mlp_proj, linear_in) are their
    canonical slices of the base, each perturbed on its own (the slices are separate operators,
    keys.py); a source's are drawn whole."""
    h, m = cfg.hidden, cfg.mlp
    fused = {"attn.to_qkv_mlp_proj": tuple(zip(SINGLE_SLICES, (h, h, h, m, m))),
             "linear_in": tuple(zip(GLU_SLICES, (m, m)))}

    def value(component: str, name: str, shape: tuple[int, ...]):
        stem = name[: -len(".weight")]
        parts = next((v for k, v in fused.items() if stem.endswith("." + k)), None)
        if parts is None or getattr(values, "base", None) is None:
            return values(component, name, shape)
        return torch.cat([values(component, f"{stem}.{s}.weight", (rows, *shape[1:])) for s, rows in parts])
    return value


_KLEIN4 = Flux2Config()
_KLEIN9 = Flux2Config(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288)
FLUX2_PRESETS: dict[str, Flux2Config] = {
    "flux2-klein-4b-base": replace(_KLEIN4, is_distilled=False), "flux2-klein-4b": _KLEIN4,
    "flux2-klein-9b-base": replace(_KLEIN9, is_distilled=False), "flux2-klein-9b": _KLEIN9,
    "flux2-dev": Flux2Config(num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360,
                             guidance_embeds=True, pipeline="Flux2Pipeline", is_distilled=None),
}
PRESETS = FLUX2_PRESETS
# scale -> (double blocks, single blocks, heads, head dim, in channels, joint dim, timestep channels, rope axes)
SCALES = {
    "full": None,
    "small": (3, 6, 6, 64, 64, 512, 256, (16, 16, 16, 16)),
    "tiny": (2, 3, 2, 16, 16, 24, 16, (4, 4, 4, 4)),
}


def flux2_config(name: str = "flux2-klein-4b", scale: str = "full", blocks: tuple[int, int] | None = None) -> Flux2Config:
    """A preset of FLUX2_PRESETS at a scale of SCALES, with `blocks` = (double, single) instead of
    the scale's."""
    if name not in FLUX2_PRESETS:
        raise ValueError(f"unknown FLUX.2 preset {name!r}; choose one of {sorted(FLUX2_PRESETS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    cfg = FLUX2_PRESETS[name]
    if SCALES[scale] is not None:
        d, s, heads, hd, cin, joint, tch, axes = SCALES[scale]
        cfg = replace(cfg, num_layers=d, num_single_layers=s, num_attention_heads=heads, attention_head_dim=hd,
                      in_channels=cin, joint_attention_dim=joint, timestep_guidance_channels=tch, axes_dims_rope=axes)
    if blocks is not None:
        cfg = replace(cfg, num_layers=int(blocks[0]), num_single_layers=int(blocks[1]))
    return cfg


def preset(name: str, scale: str = "full") -> Flux2Config:
    """prolora.synthetic.preset's hook."""
    return flux2_config(name, scale)


def flux2_params(cfg: Flux2Config) -> Params:
    """(diffusers name, shape) of every Flux2Transformer2DModel parameter, in state_dict order."""
    h, m, hd, t = cfg.hidden, cfg.mlp, cfg.attention_head_dim, cfg.timestep_guidance_channels
    p = ParamList()
    embedders = ("timestep_embedder", "guidance_embedder") if cfg.guidance_embeds else ("timestep_embedder",)
    for e in embedders:
        p.linear(f"time_guidance_embed.{e}.linear_1", h, t, bias=False)
        p.linear(f"time_guidance_embed.{e}.linear_2", h, h, bias=False)
    p.linear("double_stream_modulation_img.linear", 6 * h, h, bias=False)
    p.linear("double_stream_modulation_txt.linear", 6 * h, h, bias=False)
    p.linear("single_stream_modulation.linear", 3 * h, h, bias=False)
    p.linear("x_embedder", h, cfg.in_channels, bias=False)
    p.linear("context_embedder", h, cfg.joint_attention_dim, bias=False)
    for i in range(cfg.num_layers):
        b = f"transformer_blocks.{i}"
        for x in ("to_q", "to_k", "to_v"):
            p.linear(f"{b}.attn.{x}", h, h, bias=False)
        p += [(f"{b}.attn.norm_q.weight", (hd,)), (f"{b}.attn.norm_k.weight", (hd,))]
        p.linear(f"{b}.attn.to_out.0", h, h, bias=False)
        p += [(f"{b}.attn.norm_added_q.weight", (hd,)), (f"{b}.attn.norm_added_k.weight", (hd,))]
        for x in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            p.linear(f"{b}.attn.{x}", h, h, bias=False)
        for ff in ("ff", "ff_context"):
            p.linear(f"{b}.{ff}.linear_in", 2 * m, h, bias=False)
            p.linear(f"{b}.{ff}.linear_out", h, m, bias=False)
    for i in range(cfg.num_single_layers):
        b = f"single_transformer_blocks.{i}"
        p.linear(f"{b}.attn.to_qkv_mlp_proj", 3 * h + 2 * m, h, bias=False)
        p += [(f"{b}.attn.norm_q.weight", (hd,)), (f"{b}.attn.norm_k.weight", (hd,))]
        p.linear(f"{b}.attn.to_out", h, h + m, bias=False)
    p.linear("norm_out.linear", 2 * h, h, bias=False)
    p.linear("proj_out", cfg.in_channels, h, bias=False)
    return list(p)


def bfl_plan(cfg: Flux2Config, params: Params) -> list[tuple[str, tuple[int, ...], tuple[str, ...], bool]]:
    """(BFL key, shape, the diffusers parameters concatenated into it, halves swapped) for a
    single file: the reader's own places (keys.places) read backwards, plus the norm scales."""
    shapes = dict(params)
    groups: dict[str, list[tuple[int, str]]] = {}
    swap: set[str] = set()
    s = Structure(cfg.hidden, cfg.mlp, cfg.num_layers, cfg.num_single_layers, cfg.guidance_embeds)
    for p in places(s):
        key, name = f"{p.bfl}.weight", f"{p.dif}.weight"
        start = 0 if p.bfl_rows is None or len(p.bfl_rows) > 1 else p.bfl_rows[0][0]
        if p.bfl_rows is not None and len(p.bfl_rows) > 1:
            swap.add(key)
        if p.dif_rows is None or p.dif_rows[0][0] == 0:  # a fused diffusers weight is written once
            groups.setdefault(key, []).append((start, name))
    norms = {"transformer_blocks": ("double_blocks", {v[:-len(".weight")]: k for k, v in DOUBLE_NORMS.items()}),
             "single_transformer_blocks": ("single_blocks", {v[:-len(".weight")]: k for k, v in SINGLE_NORMS.items()})}
    for name, _ in params:
        m = re.match(r"^((?:single_)?transformer_blocks)\.(\d+)\.(.+)\.weight$", name)
        if m and m.group(3) in norms[m.group(1)][1]:
            bfl, table = norms[m.group(1)]
            groups[f"{bfl}.{m.group(2)}.{table[m.group(3)]}"] = [(0, name)]
    out = []
    for key, parts in groups.items():
        names = tuple(n for _, n in sorted(parts))
        out.append((key, (sum(shapes[n][0] for n in names), *shapes[names[0]][1:]), names, key in swap))
    if sum(len(n) for _, _, n, _ in out) != len(params):
        raise ValueError("FLUX.2 BFL plan: not every diffusers parameter has a BFL key")
    return out


def _write_bfl(path: Path, cfg: Flux2Config, params: Params, prefix: str, values: Values, dtype: torch.dtype,
               meta: dict[str, str]) -> None:
    shapes = dict(params)
    items = []
    for key, shape, names, swapped in bfl_plan(cfg, params):
        def make(names=names, swapped=swapped):
            parts = [values(COMPONENT, n, shapes[n]) for n in names]
            t = torch.cat(parts) if len(parts) > 1 else parts[0]
            if swapped:
                a, b = t.chunk(2)
                t = torch.cat([b, a])
            return t
        items.append((prefix + key, shape, make))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(path, items, dtype, meta)


# ----------------------------------------------------------------------------- LoRAs

_SPELLING = {"kohya": "kohya-ldm", "peft": "peft", "comfy": "comfy"}


def flux2_lora_targets(modules, targets: str = "transformer"):
    """Canonical FLUX.2 ids a LoRA of this kind adapts: "attn" (attention of the double blocks and
    the single blocks' fused projections), "transformer" (every linear of the blocks), "all"
    (also the embedders, the shared modulation and the output layers)."""
    check_targets(targets)
    for module in modules:
        in_block = module.startswith((f"{COMPONENT}.transformer_blocks.", f"{COMPONENT}.single_transformer_blocks."))
        if chosen(targets, attn=".attn." in module, transformer=in_block):
            yield module


def write_lora_modules(m: BaseModel, format: str, rank: int, alpha: float, targets: str, seed: int, size: float,
                       split_qkv: bool = False, spelling: str | None = None, lora_ab: bool = False,
                       **_ignored: object) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """prolora.synthetic.write_lora's hook: one pair per key the spelling gives; a fused key
    (BFL qkv / linear1 / img_mlp.0, diffusers to_qkv_mlp_proj / linear_in) gets one down and an up
    whose row blocks are its slices' (block-diagonal, one rank-`rank` pair per slice, under
    split_qkv). `lora_ab`: ai-toolkit's keys (written by save_lora)."""
    spelling = format_spelling(format, spelling, _SPELLING, "FLUX.2", lora_ab)
    mods = fused_pairs(m, flux2_lora_targets(m.weights, targets), spelling, rank, alpha, seed, size, split_qkv)
    return mods, {"ss_base_model_version": "flux2"}


# ----------------------------------------------------------------------------- conformance, bench

_DROPPED = ("diffusers' Flux2 loader takes any file with .lora_down keys for kohya (lora_unet_ names only) and "
            "drops ComfyUI's diffusion_model.* keys ('Unsupported keys for Kohya Flux2 LoRA conversion')")
CONFORMANCE = Conformance(
    pairs=(("flux2-klein-4b-base:tiny", "flux2-klein-4b:tiny"),),
    layouts=LAYOUTS,
    loras={"kohya": {"format": "kohya"},  # BFL names, fused qkv / linear1 / img_mlp.0 (sd-scripts, musubi-tuner)
           "kohya-split": {"format": "kohya", "split_qkv": True},  # kohya's split_qkv form of the fused keys
           "peft": {"format": "peft"},  # diffusers, SimpleTuner: to_qkv_mlp_proj, linear_in whole
           "comfy": {"format": "comfy"},  # ComfyUI: diffusion_model.<BFL> + lora_down / lora_up
           "ai-toolkit": {"format": "comfy", "lora_ab": True}},  # diffusion_model.<BFL> + lora_A / lora_B, no alpha
    component=COMPONENT,
    model_classes={MEMBER: CLASS},
    pipelines={MEMBER: "Flux2KleinPipeline"},
    dtype="bfloat16",
    loader_gaps={"comfy": _DROPPED, "ai-toolkit": _DROPPED},
)

# `prolora bench --family flux2-klein`: [klein] 4B base -> distilled, LoRAs on every linear of the
# blocks (attention, SwiGLU MLPs, the single blocks' fused projections) as PEFT, as diffusers and
# SimpleTuner write them (to_qkv_mlp_proj and linear_in are fused keys cut into their slices)
BENCH_LORA = ("peft", re.compile(r"^transformer\.(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|"
                                 r"add_v_proj|to_out\.0|to_add_out)|ff(_context)?\.(linear_in\.(gate|up)|linear_out))|"
                                 r"single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj\.\w+|to_out))$"))


def module_shapes(cfg: Flux2Config) -> dict[str, tuple[int, ...]]:
    """{canonical id: weight shape} of a model of `cfg`, without a file (the bench's dry-run
    plan): the fused weights' slices are modules of their own (keys.py)."""
    shapes = dict(flux2_params(cfg))
    out = {}
    for p in places(Structure(cfg.hidden, cfg.mlp, cfg.num_layers, cfg.num_single_layers, cfg.guidance_embeds)):
        inner = shapes[f"{p.dif}.weight"][1:]
        rows = p.dif_rows or ((0, shapes[f"{p.dif}.weight"][0]),)
        out[f"{COMPONENT}.{p.path}"] = (sum(b - a for a, b in rows), *inner)
    return out


def bench_pair(name: str, width: float, depth: float) -> tuple[Flux2Config, Flux2Config]:
    """(source, target): [klein] 4B base and distilled at full width (width 1, 3072) or the small
    preset, `depth` of the 5 double and 20 single blocks."""
    scale = "full" if width >= 1.0 else "small"
    full = flux2_config("flux2-klein-4b", "full")
    blocks = (max(1, round(full.num_layers * depth)), max(1, round(full.num_single_layers * depth)))
    return (flux2_config("flux2-klein-4b-base", scale, blocks), flux2_config("flux2-klein-4b", scale, blocks))
