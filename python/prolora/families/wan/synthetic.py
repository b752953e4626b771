"""Wan-shaped base models and LoRAs on disk (diffusers WanTransformer3DModel layouts).

Layouts: a diffusers folder (transformer/ with config.json, sharded like `save_pretrained`), a
Wan 2.2 A14B pipeline folder with both experts (transformer/ high-noise, transformer_2/
low-noise, model_index.json with boundary_ratio), and single files with the original Wan keys,
bare or under ComfyUI's `model.diffusion_model.` (ComfyUI's split expert files). Original names
come from the reader's own map (keys.diffusers_to_original), so a synthetic file is
read back by the same map that reads real ones; tests/families/test_wan.py checks the map against
diffusers' own converter and the parameter list against WanTransformer3DModel.

Presets (diffusers config fields; published sizes):
    wan2.1-t2v-14b   40 blocks, width 5120 (40 heads of 128), ffn 13824, 16 latent channels;
                     also the layout of each Wan 2.2 A14B expert
    wan2.1-t2v-1.3b  30 blocks, width 1536, ffn 8960
    wan2.2-ti2v-5b   30 blocks, width 3072 (24 heads of 128), ffn 14336, 48 latent channels
":tiny" keeps each preset's structure (latent channels, text width ratio) at a few dozen channels.

What prolora.synthetic asks of this part (no family named there): `PRESETS` and `preset(name,
scale)`; a WanConfig's `layouts`, `params()`, `facts()` and `write(...)` (write_model);
`write_lora_modules(...)` (write_lora); `EXPORTS` (the names prolora.synthetic re-exports) and
`CONFORMANCE` (tests/families/test_conformance.py).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ...checkpoints import BaseModel
from ...lora import LoraModule
from ...synthetic.conformance import Conformance
from ...synthetic.loras import check_targets, chosen, spelled_pairs
from ...synthetic.loras import write_lora as write_synthetic_lora
from ...synthetic.models import model_values, write_model
from ...synthetic.params import Params
from ...synthetic.values import Perturbation, Values
from ...synthetic.writing import write_tensors, write_transformer_folder
from .experts import EXPERTS
from .keys import COMPONENT, diffusers_to_original

# the names prolora.synthetic re-exports from this part (imported on first use there)
EXPORTS = ("WanConfig", "wan_config", "wan_params", "write_wan22_experts", "write_wan_lora", "write_wan_model")
LAYOUTS = ("diffusers", "single-file", "single-file-prefixed")
BOUNDARY_RATIO = 0.875  # Wan 2.2 T2V A14B's model_index.json


@dataclass(frozen=True)
class WanConfig:
    """WanTransformer3DModel's config fields (image_dim / added_kv_proj_dim: Wan 2.1 I2V's image
    cross-attention; None for text-to-video and for Wan 2.2's I2V experts)."""

    num_layers: int = 40
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    ffn_dim: int = 13824
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    image_dim: int | None = None  # Wan 2.1 I2V: CLIP image features (1280), projected by img_emb
    added_kv_proj_dim: int | None = None  # Wan 2.1 I2V: k_img / v_img input width (the model width)

    # what prolora.synthetic.write_model asks of a config (see synthetic.configs)
    family = "wan"  # the label the file metadata gives every Wan model
    layouts = LAYOUTS
    derived_from = ()
    dtype = torch.bfloat16
    threads = 1

    @property
    def hidden(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def params(self) -> dict[str, Params]:
        """{component: params} (write_model's model_params)."""
        return {COMPONENT: wan_params(self)}

    def facts(self) -> dict:
        """What the file metadata says of the model besides the family and seed: its config."""
        return {"config": self.diffusers_config()}

    def write(self, path: Path, params: dict[str, Params], layout: str, values: Values, dtype: torch.dtype,
              meta: dict[str, str], shard_bytes: int) -> None:
        """write_model's hook: a pipeline folder, or one file of original Wan keys (bare or under
        ComfyUI's prefix)."""
        if layout == "diffusers":
            _write_component(path / COMPONENT, self, values, dtype, meta, shard_bytes)
            _model_index(path, {COMPONENT: ["diffusers", "WanTransformer3DModel"]})
        else:
            prefix = "model.diffusion_model." if layout == "single-file-prefixed" else ""
            _write_original(path, self, prefix, values, dtype, meta)

    def diffusers_config(self) -> dict:
        """config.json of a transformer folder (what WanTransformer3DModel(**...) takes, plus _class_name)."""
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.35.0", **d}


WAN_PRESETS = {
    "wan2.1-t2v-14b": WanConfig(),
    "wan2.1-t2v-1.3b": WanConfig(num_layers=30, num_attention_heads=12, ffn_dim=8960),
    "wan2.2-ti2v-5b": WanConfig(num_layers=30, num_attention_heads=24, ffn_dim=14336, in_channels=48,
                                out_channels=48),
    "wan2.1-i2v-14b": WanConfig(in_channels=36, image_dim=1280, added_kv_proj_dim=5120),
}
# tiny sizes: (blocks, heads, head dim, ffn), text width 64, 32 timestep channels; latent channels kept
WAN_TINY = {"wan2.1-t2v-14b": (3, 2, 16, 88), "wan2.1-t2v-1.3b": (2, 2, 8, 56), "wan2.2-ti2v-5b": (2, 2, 12, 112),
            "wan2.1-i2v-14b": (3, 2, 16, 88)}


PRESETS = WAN_PRESETS  # prolora.synthetic.preset's names


def preset(name: str, scale: str = "full") -> WanConfig:
    """prolora.synthetic.preset's hook: a preset of WAN_PRESETS at "full" or "tiny" size."""
    return wan_config(name, scale)


def wan_config(name: str = "wan2.1-t2v-14b", scale: str = "full") -> WanConfig:
    """A Wan preset (see the module doc) at "full" or "tiny" size; also "NAME:SCALE"."""
    if ":" in name:
        name, scale = name.split(":", 1)
    if name not in WAN_PRESETS:
        raise ValueError(f"unknown Wan preset {name!r}; choose one of {sorted(WAN_PRESETS)}")
    cfg = WAN_PRESETS[name]
    if scale == "tiny":
        blocks, heads, hd, ffn = WAN_TINY[name]
        cfg = replace(cfg, num_layers=blocks, num_attention_heads=heads, attention_head_dim=hd, ffn_dim=ffn,
                      text_dim=64, freq_dim=32, image_dim=cfg.image_dim and 40,
                      added_kv_proj_dim=cfg.added_kv_proj_dim and heads * hd)
    elif scale != "full":
        raise ValueError(f"unknown scale {scale!r}; choose full or tiny")
    return cfg


def wan_params(cfg: WanConfig) -> Params:
    """(diffusers name, shape) of every WanTransformer3DModel parameter, in state_dict order."""
    h, f = cfg.hidden, cfg.ffn_dim
    # a module's own parameters come before its submodules' (scale_shift_table first)
    p: Params = [("scale_shift_table", (1, 2, h)), ("patch_embedding.weight", (h, cfg.in_channels, *cfg.patch_size)),
                 ("patch_embedding.bias", (h,))]

    def linear(name: str, out: int, inp: int) -> None:
        p.extend([(f"{name}.weight", (out, inp)), (f"{name}.bias", (out,))])

    linear("condition_embedder.time_embedder.linear_1", h, cfg.freq_dim)
    linear("condition_embedder.time_embedder.linear_2", h, h)
    linear("condition_embedder.time_proj", 6 * h, h)
    linear("condition_embedder.text_embedder.linear_1", h, cfg.text_dim)
    linear("condition_embedder.text_embedder.linear_2", h, h)
    if cfg.image_dim:
        img = "condition_embedder.image_embedder"
        p.extend([(f"{img}.norm1.weight", (cfg.image_dim,)), (f"{img}.norm1.bias", (cfg.image_dim,))])
        linear(f"{img}.ff.net.0.proj", cfg.image_dim, cfg.image_dim)
        linear(f"{img}.ff.net.2", h, cfg.image_dim)
        p.extend([(f"{img}.norm2.weight", (h,)), (f"{img}.norm2.bias", (h,))])
    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        p.append((f"{b}.scale_shift_table", (1, 6, h)))
        for attn in ("attn1", "attn2"):
            for x in ("to_q", "to_k", "to_v", "to_out.0"):
                linear(f"{b}.{attn}.{x}", h, h)
            p.extend([(f"{b}.{attn}.norm_q.weight", (h,)), (f"{b}.{attn}.norm_k.weight", (h,))])
            if attn == "attn2" and cfg.added_kv_proj_dim:
                linear(f"{b}.attn2.add_k_proj", h, cfg.added_kv_proj_dim)
                linear(f"{b}.attn2.add_v_proj", h, cfg.added_kv_proj_dim)
                p.append((f"{b}.attn2.norm_added_k.weight", (h,)))
        if cfg.cross_attn_norm:
            p.extend([(f"{b}.norm2.weight", (h,)), (f"{b}.norm2.bias", (h,))])
        linear(f"{b}.ffn.net.0.proj", f, h)
        linear(f"{b}.ffn.net.2", h, f)
    linear("proj_out", cfg.out_channels * math.prod(cfg.patch_size), h)
    return p


def write_wan_model(path: str | os.PathLike, cfg: WanConfig | str = "wan2.1-t2v-14b:tiny", layout: str = "diffusers",
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                    base: str | os.PathLike | BaseModel | None = None,
                    perturbation: Perturbation | float = Perturbation(), shard_bytes: int = 10 * 2**30) -> Path:
    """Write one Wan transformer at `path`; returns `path`.

    `layout`: "diffusers" (a pipeline folder with transformer/ in shards of at most `shard_bytes`),
    "single-file" (original Wan keys) or "single-file-prefixed" (under `model.diffusion_model.`).
    `base`: a Wan model written earlier with the same config and seed; the result is then a
    TARGET, each weight the base's plus `perturbation` (see synthetic.values)."""
    cfg = wan_config(cfg) if isinstance(cfg, str) else cfg
    return write_model(path, cfg, layout, dtype, seed, base, perturbation, shard_bytes=shard_bytes)


def write_wan22_experts(path: str | os.PathLike, cfg: WanConfig | str = "wan2.1-t2v-14b:tiny",
                        dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                        base: str | os.PathLike | BaseModel | None = None,
                        high_noise: Perturbation = Perturbation(size=0.08, seed=21),
                        low_noise: Perturbation = Perturbation(size=0.05, seed=22),
                        layout: str = "diffusers", shard_bytes: int = 10 * 2**30) -> dict[str, Path]:
    """A Wan 2.2 A14B-shaped pair of experts, each `base` plus its own perturbation (two
    fine-tunes of one model, as the experts are of Wan 2.1's layout).

    layout "diffusers": one pipeline folder at `path` with transformer/ (high-noise) and
    transformer_2/ (low-noise) and model_index.json (WanPipeline, boundary_ratio); returns
    {"pipeline": path, "high_noise": path/transformer, "low_noise": path/transformer_2}.
    layout "single-file-prefixed" / "single-file": ComfyUI's split files in the folder `path`
    (`wan2.2_t2v_high_noise_14B_fp16.safetensors`, `..._low_noise_...`)."""
    cfg = wan_config(cfg) if isinstance(cfg, str) else cfg
    path = Path(path)
    out: dict[str, Path] = {}
    for label, p in (("high_noise", high_noise), ("low_noise", low_noise)):
        with model_values("wan", seed, base, p, threads=1, config=cfg.diffusers_config()) as (values, meta):
            if layout == "diffusers":
                out[label] = _write_component(path / EXPERTS[label], cfg, values, dtype, meta, shard_bytes)
            else:
                prefix = "model.diffusion_model." if layout == "single-file-prefixed" else ""
                out[label] = path / f"wan2.2_t2v_{label}_14B_fp16.safetensors"
                _write_original(out[label], cfg, prefix, values, dtype, meta)
    if layout == "diffusers":
        _model_index(path, {c: ["diffusers", "WanTransformer3DModel"] for c in EXPERTS.values()},
                     boundary_ratio=BOUNDARY_RATIO)
        out["pipeline"] = path
    return out


def _write_component(folder: Path, cfg: WanConfig, values: Values, dtype: torch.dtype, meta: dict[str, str],
                     shard_bytes: int) -> Path:
    """config.json and the weights (sharded with an index when more than one file), like
    save_pretrained, through synthetic.writing's transformer folder (its model_index.json is
    replaced by the caller). transformer_2/ is written as a staging transformer/ and moved."""
    parent = folder.parent if folder.name == COMPONENT else folder.parent / f".{folder.name}.staging"
    write_transformer_folder(parent, cfg, wan_params(cfg), values, dtype, meta, shard_bytes)
    if parent != folder.parent:
        (parent / COMPONENT).rename(folder)
        (parent / "model_index.json").unlink()
        parent.rmdir()
    return folder


def _model_index(path: Path, components: dict[str, list[str]], **config) -> None:
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.35.0", **components, **config}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


def _write_original(path: Path, cfg: WanConfig, prefix: str, values: Values, dtype: torch.dtype,
                    meta: dict[str, str]) -> None:
    """One file with original Wan keys (the reader's own map), in diffusers' parameter order."""
    items = []
    for name, shape in wan_params(cfg):
        key = diffusers_to_original(name)
        if key is None:
            raise ValueError(f"Wan parameter '{name}' has no original name")
        items.append((prefix + key, shape, (lambda n=name, s=shape: values(COMPONENT, n, s))))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(path, items, dtype, meta)


# ----------------------------------------------------------------------------- LoRAs


def wan_lora_targets(model: BaseModel, targets: str = "transformer") -> list[str]:
    """Canonical ids a Wan LoRA adapts: "attn" (self and cross attention q/k/v/o), "transformer"
    (every linear of the blocks: attention and ffn, what musubi-tuner and diffusers trainers
    target), "all" (also the embedders and proj_out)."""
    check_targets(targets)
    out = []
    for module in model.weights:
        if not module.startswith(COMPONENT + "."):
            continue
        in_block = module.startswith(f"{COMPONENT}.blocks.")
        if chosen(targets, attn=in_block and (".attn1." in module or ".attn2." in module), transformer=in_block):
            out.append(module)
    return out


def write_wan_lora(model: str | os.PathLike | BaseModel, path: str | os.PathLike, format: str = "peft",
                   rank: int = 4, alpha: float | None = None, targets: str = "transformer", seed: int = 0,
                   size: float = 0.05) -> Path:
    """A synthetic Wan LoRA as the trainers write it: format "peft" (diffusers / ai-toolkit,
    `transformer.blocks.0.attn1.to_q.lora_A.weight`), "kohya" (musubi-tuner,
    `lora_unet_blocks_0_self_attn_q.lora_down.weight` + alpha) or "comfy"
    (`diffusion_model.blocks.0.self_attn.q.lora_down.weight`). Each module's delta has Frobenius
    norm about `size` * sqrt(out); alpha defaults to rank / 2."""
    return write_synthetic_lora(model, path, format, rank, alpha, targets, seed, size=size)


def write_lora_modules(m: BaseModel, format: str, rank: int, alpha: float, targets: str, seed: int, size: float,
                       spelling: str | None = None, **_ignored: object) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """prolora.synthetic.write_lora's hook (see write_wan_lora; `spelling` "kohya-diffusers":
    `lora_transformer_<diffusers path>`): bf16 modules and the base-model metadata."""
    spelling = spelling or {"peft": "peft", "kohya": "kohya-ldm", "comfy": "comfy"}.get(format)
    if spelling is None:
        raise ValueError(f"format {format!r} has no Wan layout here; use peft, kohya or comfy")
    mods = spelled_pairs(m, wan_lora_targets(m, targets), spelling, rank, alpha, seed, size, torch.bfloat16)
    return mods, {"ss_base_model_version": "wan"}


# ----------------------------------------------------------------------------- conformance

CONFORMANCE = Conformance(
    pairs=(("wan2.1-t2v-14b:tiny", "wan2.1-t2v-14b:tiny"), ("wan2.2-ti2v-5b:tiny", "wan2.2-ti2v-5b:tiny")),
    layouts=LAYOUTS,
    loras={"peft": {"format": "peft"},  # diffusers, ai-toolkit: transformer.blocks.0.attn1.to_q
           "kohya": {"format": "kohya"},  # musubi-tuner: lora_unet_blocks_0_self_attn_q (original names)
           "comfy": {"format": "comfy"}},  # ComfyUI / DiffSynth: diffusion_model.blocks.0.self_attn.q
    component=COMPONENT,
    model_classes={"wan": "WanTransformer3DModel", "wan-ti2v": "WanTransformer3DModel"},
    pipelines={"wan": "WanPipeline", "wan-ti2v": "WanPipeline"},
    dtype="bfloat16",
)
