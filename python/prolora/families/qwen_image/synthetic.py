"""Qwen-Image-shaped base models and LoRAs on disk, in the layouts people download.

Entry points:

    write_qwen_model(path, config="qwen-image:tiny", layout="diffusers", seed=0, dtype=torch.bfloat16,
                     base=None, perturbation=Perturbation(), shard_bytes=..., device=None) -> Path
        layout "diffusers": a pipeline folder (model_index.json with the config's pipeline class,
        transformer/config.json, transformer/ weights in shards of at most `shard_bytes` with a
        `diffusion_pytorch_model.safetensors.index.json` when there is more than one; its
        transformer/ is the bare transformer folder); "single-file": one file with bare diffusers
        names (ComfyUI's qwen_image_bf16.safetensors); "single-file-prefixed": the same keys under
        `model.diffusion_model.` (a ComfyUI-saved checkpoint).
        `base`: a source written earlier with the same config and seed: the result is a TARGET,
        each weight the source's plus a fine-tune-like `perturbation` (values.Values), the other
        parameters equal. Deterministic: a value depends only on seed, name (and the base).
    qwen_config(scale="tiny" | "small" | "full", blocks=None, edit=False) -> QwenConfig
        full: Qwen-Image's own config (60 blocks, 24 heads of 128 = width 3072, MLP 12288, joint
        3584, in 64, out 16); small: width 384; tiny: width 32. `blocks` overrides the block count
        (a full-width model with 2 blocks for a bench: `qwen_config("full", blocks=2)`), `edit`
        writes the Qwen-Image-Edit pipeline class (the weights' layout is the same).
    write_qwen_lora(model, path, format="kohya", ...) -> Path
        a LoRA on the model's transformer spelled as each trainer writes it (see its docstring).

Parameter names and shapes follow diffusers' QwenImageTransformer2DModel (tests/families/test_qwen.py
checks them against the class).

What prolora.synthetic asks of this part (no family named there): `PRESETS` ("qwen-image",
"qwen-image-edit") and `preset(name, scale)`; a QwenConfig's `layouts`, `params()` and `write(...)`
(write_model, which write_qwen_model calls); `write_lora_modules(...)` and `save_lora(...)`
(write_lora, which write_qwen_lora calls); `EXPORTS` (the names prolora.synthetic re-exports) and
`CONFORMANCE` (tests/families/test_conformance.py).
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ...checkpoints import BaseModel
from ...lora import LoraModule
from ...synthetic.conformance import Conformance
from ...synthetic.loras import (
    check_targets,
    chosen,
    format_spelling,
    save_lora,  # noqa: F401  (the part's hook: ai-toolkit's lora_A / lora_B keys)
    spelled_pairs,
)
from ...synthetic.loras import write_lora as write_synthetic_lora
from ...synthetic.models import write_model
from ...synthetic.params import ParamList, Params
from ...synthetic.values import Perturbation, Values
from ...synthetic.writing import write_tensors, write_transformer_folder
from .keys import CLASS, COMPONENT, MEMBER

# the names prolora.synthetic re-exports from this part (imported on first use there)
EXPORTS = ("QwenConfig", "qwen_config", "qwen_params", "write_qwen_lora", "write_qwen_model")

LAYOUTS = ("diffusers", "single-file", "single-file-prefixed")


@dataclass(frozen=True)
class QwenConfig:
    """QwenImageTransformer2DModel's config fields (defaults: Qwen-Image at full size) and the
    pipeline class written to model_index.json."""

    family: str = MEMBER
    num_layers: int = 60
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    in_channels: int = 64
    out_channels: int = 16
    patch_size: int = 2
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    pipeline: str = "QwenImagePipeline"

    # what prolora.synthetic.write_model asks of a config (see synthetic.configs)
    layouts = LAYOUTS
    derived_from = ()
    dtype = torch.bfloat16
    shard_bytes = 5 * 2**30

    @property
    def hidden(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def params(self) -> dict[str, Params]:
        """{component: params} (write_model's model_params)."""
        return {COMPONENT: qwen_params(self)}

    def write(self, path: Path, params: dict[str, Params], layout: str, values: Values, dtype: torch.dtype,
              meta: dict[str, str], shard_bytes: int) -> None:
        """write_model's hook: one file (bare diffusers names, or under ComfyUI's prefix) or a
        pipeline folder."""
        if layout.startswith("single-file"):
            prefix = "model.diffusion_model." if layout == "single-file-prefixed" else ""
            items = [(prefix + n, s, (lambda n=n, s=s: values(COMPONENT, n, s))) for n, s in params[COMPONENT]]
            path.parent.mkdir(parents=True, exist_ok=True)
            write_tensors(path, items, dtype, meta)
        else:
            _write_folder(path, self, params[COMPONENT], values, dtype, meta, shard_bytes)

    def diffusers_config(self) -> dict:
        """transformer/config.json (what QwenImageTransformer2DModel(**...) takes, minus the keys
        starting with `_`)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("family", "pipeline")}
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return {"_class_name": CLASS, "_diffusers_version": "0.35.0", "guidance_embeds": False, **d}

    def model_config(self) -> dict:
        """The config as keyword arguments of QwenImageTransformer2DModel."""
        return {k: v for k, v in self.diffusers_config().items() if not k.startswith("_")}


# scale -> (blocks, heads, head dim, in channels, out channels, joint dim, rope axes (summing to head dim))
QWEN_SCALES = {
    "full": None,
    "small": (4, 6, 64, 64, 16, 512, (8, 28, 28)),
    "tiny": (2, 2, 16, 16, 4, 24, (4, 6, 6)),
}


def qwen_config(scale: str = "full", blocks: int | None = None, edit: bool = False) -> QwenConfig:
    """Qwen-Image's transformer at "full", "small" (width 384) or "tiny" (width 32) size, with
    `blocks` transformer blocks instead of the scale's; `edit`: a Qwen-Image-Edit pipeline."""
    if scale not in QWEN_SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(QWEN_SCALES)}")
    cfg = QwenConfig()
    if QWEN_SCALES[scale] is not None:
        n, heads, hd, cin, cout, joint, axes = QWEN_SCALES[scale]
        cfg = replace(cfg, num_layers=n, num_attention_heads=heads, attention_head_dim=hd, in_channels=cin,
                      out_channels=cout, joint_attention_dim=joint, axes_dims_rope=axes)
    if blocks is not None:
        cfg = replace(cfg, num_layers=int(blocks))
    if edit:
        cfg = replace(cfg, pipeline="QwenImageEditPipeline")
    return cfg


# prolora.synthetic.preset's names (at full size; `preset` scales them)
PRESETS = {"qwen-image": QwenConfig(), "qwen-image-edit": QwenConfig(pipeline="QwenImageEditPipeline")}


def preset(name: str, scale: str = "full") -> QwenConfig:
    """prolora.synthetic.preset's hook: "qwen-image" or "qwen-image-edit" at a scale of QWEN_SCALES."""
    if name not in PRESETS:
        raise ValueError(f"unknown Qwen-Image preset {name!r}; use 'qwen-image' or 'qwen-image-edit'")
    return qwen_config(scale, edit=name == "qwen-image-edit")


def _resolve(config: QwenConfig | str) -> QwenConfig:
    """A config, or "qwen-image[:scale]" / "qwen-image-edit[:scale]"."""
    if isinstance(config, QwenConfig):
        return config
    name, _, scale = config.partition(":")
    return preset(name, scale or "full")


def qwen_params(cfg: QwenConfig) -> Params:
    """(diffusers name, shape) of every QwenImageTransformer2DModel parameter, in state_dict order."""
    h, hd, mlp = cfg.hidden, cfg.attention_head_dim, 4 * cfg.hidden
    p = ParamList()
    p.linear("time_text_embed.timestep_embedder.linear_1", h, 256)
    p.linear("time_text_embed.timestep_embedder.linear_2", h, h)
    p.append(("txt_norm.weight", (cfg.joint_attention_dim,)))
    p.linear("img_in", h, cfg.in_channels)
    p.linear("txt_in", h, cfg.joint_attention_dim)
    for i in range(cfg.num_layers):
        b = f"transformer_blocks.{i}"
        p.linear(f"{b}.img_mod.1", 6 * h, h)
        p += [(f"{b}.attn.norm_q.weight", (hd,)), (f"{b}.attn.norm_k.weight", (hd,))]
        for x in ("to_q", "to_k", "to_v"):
            p.linear(f"{b}.attn.{x}", h, h)
        for x in ("add_k_proj", "add_v_proj", "add_q_proj", "to_out.0", "to_add_out"):
            p.linear(f"{b}.attn.{x}", h, h)
        p += [(f"{b}.attn.norm_added_q.weight", (hd,)), (f"{b}.attn.norm_added_k.weight", (hd,))]
        p.linear(f"{b}.img_mlp.net.0.proj", mlp, h)
        p.linear(f"{b}.img_mlp.net.2", h, mlp)
        p.linear(f"{b}.txt_mod.1", 6 * h, h)
        p.linear(f"{b}.txt_mlp.net.0.proj", mlp, h)
        p.linear(f"{b}.txt_mlp.net.2", h, mlp)
    p.linear("norm_out.linear", 2 * h, h)
    p.linear("proj_out", cfg.patch_size ** 2 * cfg.out_channels, h)
    return list(p)


def write_qwen_model(path: str | os.PathLike, config: QwenConfig | str = "qwen-image:tiny", layout: str = "diffusers",
                     seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                     base: str | os.PathLike | BaseModel | None = None,
                     perturbation: Perturbation | float = Perturbation(), shard_bytes: int = 5 * 2**30,
                     device: str | None = None, threads: int | None = None) -> Path:
    """Write a synthetic Qwen-Image-shaped model at `path`; returns `path` (see the module doc).

    A full-width model with few blocks (`qwen_config("full", blocks=2)`: 2 x 340M parameters plus
    the embedders, ~1.4 GB in bf16) takes a few minutes on 2 CPU cores; `device="cuda"` draws the
    values on a GPU (other values, the same layout). `threads`: torch threads while generating
    (default: 1 below 100M parameters, else torch's).
    """
    return write_model(path, _resolve(config), layout, dtype, seed, base, perturbation, threads, shard_bytes, device)


def _write_folder(path: Path, cfg: QwenConfig, params: Params, values: Values, dtype: torch.dtype,
                  meta: dict[str, str], shard_bytes: int) -> None:
    """A pipeline folder: transformer/ (config.json, shards, index) and a model_index.json naming
    Qwen-Image's parts."""
    write_transformer_folder(path, cfg, params, values, dtype, meta, shard_bytes, index={
        "_class_name": cfg.pipeline, "_diffusers_version": "0.35.0", "transformer": ["diffusers", CLASS],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"]})


# ----------------------------------------------------------------------------- LoRAs

# format -> the spelling each trainer writes (model.py): musubi-tuner kohya `lora_unet_`,
# diffusers / ai-toolkit PEFT `transformer.`, ComfyUI `diffusion_model.`
_SPELLING = {"kohya": "kohya-ldm", "peft": "peft", "comfy": "comfy"}


def qwen_lora_targets(modules, targets: str = "transformer"):
    """Canonical Qwen-Image transformer ids a LoRA of this kind adapts: "attn" (the attention
    projections, q/k/v/out of both streams), "transformer" (every linear of the blocks: attention,
    MLPs, img_mod / txt_mod), "all" (also img_in, txt_in, the timestep embedder, norm_out, proj_out)."""
    check_targets(targets)
    for module in modules:
        if module.startswith(f"{COMPONENT}."):
            in_block = module.startswith(f"{COMPONENT}.transformer_blocks.")
            if chosen(targets, attn=".attn." in module, transformer=in_block):
                yield module


def write_qwen_lora(model: str | os.PathLike | BaseModel, path: str | os.PathLike, format: str = "kohya",
                    rank: int = 4, alpha: float | None = None, targets: str = "transformer", seed: int = 0,
                    size: float = 0.05, spelling: str | None = None, lora_ab: bool = False,
                    extra: dict[str, LoraModule] | None = None) -> Path:
    """Write a synthetic LoRA for a Qwen-Image model; returns `path`.

    format "kohya": musubi-tuner's `lora_unet_<path>.lora_down/.lora_up/.alpha`; "peft": diffusers'
    `transformer.<path>.lora_A/.lora_B` with lora_adapter_metadata (spelling "peft-bare": no
    prefix); "comfy": `diffusion_model.<path>.lora_down/.lora_up`, or with `lora_ab` ai-toolkit's
    `diffusion_model.<path>.lora_A/.lora_B` (no alpha: the scale is folded into B).
    `extra`: modules added as given (e.g. text-encoder keys a trainer wrote). Each module's dW has
    Frobenius norm about `size` * sqrt(out); alpha defaults to rank / 2.
    """
    return write_synthetic_lora(model, path, format, rank, alpha, targets, seed, size=size, spelling=spelling,
                                lora_ab=lora_ab, extra=extra)


def write_lora_modules(m: BaseModel, format: str, rank: int, alpha: float, targets: str, seed: int, size: float,
                       spelling: str | None = None, lora_ab: bool = False, extra: dict[str, LoraModule] | None = None,
                       **_ignored: object) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """prolora.synthetic.write_lora's hook (see write_qwen_lora): the modules, no family metadata."""
    spelling = format_spelling(format, spelling, _SPELLING, "Qwen-Image", lora_ab)
    mods = spelled_pairs(m, qwen_lora_targets(m.weights, targets), spelling, rank, alpha, seed, size)
    mods.update(extra or {})
    return mods, {}


# ----------------------------------------------------------------------------- conformance

# `prolora bench`: Qwen-Image -> Qwen-Image-Edit (the same layout); its LoRAs adapt the attention
# and MLP projections of both streams of every block, as PEFT (diffusers' and ai-toolkit's layout)
BENCH_LORA = ("peft", re.compile(r"^transformer\.transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|add_q_proj|"
                                 r"add_k_proj|add_v_proj|to_out\.0|to_add_out)|(img|txt)_mlp\.net\.(0\.proj|2))$"))


def bench_pair(name: str, width: float, depth: float) -> tuple[QwenConfig, QwenConfig]:
    """(source, target) configs: Qwen-Image and Qwen-Image-Edit at full width (width 1) or the
    small preset, with `depth` of the 60 blocks."""
    blocks = max(1, round(qwen_config("full").num_layers * depth))
    scale = "full" if width >= 1.0 else "small"
    return qwen_config(scale, blocks=blocks), qwen_config(scale, blocks=blocks, edit=True)


CONFORMANCE = Conformance(
    pairs=(("qwen-image:tiny", "qwen-image-edit:tiny"),),
    layouts=LAYOUTS,
    loras={"kohya": {"format": "kohya"},  # musubi-tuner's lora_unet_
           "peft": {"format": "peft"},  # diffusers, ai-toolkit's PEFT files: transformer.
           "peft-bare": {"format": "peft", "spelling": "peft-bare"},  # no prefix (DiffSynth-Studio)
           "comfy": {"format": "comfy"},  # ComfyUI: diffusion_model. + lora_down / lora_up
           "ai-toolkit": {"format": "comfy", "lora_ab": True}},  # diffusion_model. + lora_A / lora_B, no alpha
    component=COMPONENT,
    model_classes={MEMBER: CLASS},
    pipelines={MEMBER: "QwenImagePipeline"},
    dtype="bfloat16",
    rewritten={"peft-bare": "unprefixed PEFT keys are written back under `transformer.` (model.py: diffusers "
                            "drops unprefixed keys without `.default.`; diffusers, ComfyUI, DiffSynth read prefixed)"},
)
