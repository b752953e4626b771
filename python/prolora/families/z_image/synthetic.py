"""Z-Image-shaped base models and LoRAs on disk (diffusers ZImageTransformer2DModel layouts).

Layouts: a diffusers pipeline folder (transformer/ with config.json, sharded like
`save_pretrained`; model_index.json naming ZImagePipeline), single files with the original names
ComfyUI distributes (the attention's q, k, v fused into `attention.qkv`, keys.py's map), bare or
under ComfyUI's `model.diffusion_model.`, and single files with diffusers' names. Original names
come from the reader's own map (keys.diffusers_to_original), so a synthetic file is read back by
the map that reads real ones; tests/families/test_z_image.py checks that diffusers' own single-file
converter turns such a file into the folder's weights, and the parameter list against the class.

Presets (ZImageTransformer2DModel config fields; the published size):
    z-image         Z-Image (Base): 30 blocks + 2 noise and 2 context refiner blocks at width 3840
                    (30 heads of 128), SwiGLU FFN 10240, caption features 2560 (Qwen3-4B), latent 16
    z-image-turbo   Z-Image-Turbo: the same layout (Turbo is Base distilled)
Scales: "full", "small" (width 768: 6 heads of 128, 4 blocks), "tiny" (width 64: 2 heads of 32,
2 blocks, 1 refiner block each).

What prolora.synthetic asks of this part (no family named there): `PRESETS` and `preset(name,
scale)`; a ZImageConfig's `layouts`, `params()` and `write(...)` (write_model);
`write_lora_modules(...)` and `save_lora(...)` (write_lora); `EXPORTS`, `CONFORMANCE`, and the
bench's `bench_pair` and `BENCH_LORA`.
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
    fused_pairs,
    save_lora,  # noqa: F401  (the part's hook: ai-toolkit's lora_A / lora_B keys)
)
from ...synthetic.loras import write_lora as write_synthetic_lora
from ...synthetic.models import write_model
from ...synthetic.params import ParamList, Params
from ...synthetic.values import Perturbation, Values
from ...synthetic.writing import write_tensors, write_transformer_folder
from .keys import CLASS, COMPONENT, FUSED, MEMBER, QKV, diffusers_to_original, fused_of

# the names prolora.synthetic re-exports from this part (imported on first use there)
EXPORTS = ("ZImageConfig", "z_image_config", "z_image_params", "write_z_image_lora", "write_z_image_model")
LAYOUTS = ("diffusers", "single-file", "single-file-prefixed", "single-file-diffusers")
ADALN = 256  # diffusers' ADALN_EMBED_DIM: the modulations' input is min(width, 256)


@dataclass(frozen=True)
class ZImageConfig:
    """ZImageTransformer2DModel's config fields (defaults: Z-Image at full size), which variant
    the file metadata names, and the pipeline class written to model_index.json."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None  # Z-Image-Omni's SigLIP branch
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, int, int] = (32, 48, 48)
    axes_lens: tuple[int, int, int] = (1536, 512, 512)
    variant: str = "base"
    pipeline: str = "ZImagePipeline"

    # what prolora.synthetic.write_model asks of a config (see synthetic.configs)
    family = MEMBER
    layouts = LAYOUTS
    derived_from = ()
    dtype = torch.bfloat16
    shard_bytes = 5 * 2**30

    @property
    def ffn(self) -> int:
        return int(self.dim / 3 * 8)

    def params(self) -> dict[str, Params]:
        """{component: params} (write_model's model_params)."""
        return {COMPONENT: z_image_params(self)}

    def facts(self) -> dict:
        """What the file metadata says of the model besides the family and seed."""
        return {"variant": self.variant}

    def write(self, path: Path, params: dict[str, Params], layout: str, values: Values, dtype: torch.dtype,
              meta: dict[str, str], shard_bytes: int) -> None:
        """write_model's hook: a pipeline folder, or one file (original names, bare or under
        ComfyUI's prefix; or diffusers' names)."""
        if layout == "diffusers":
            write_transformer_folder(path, self, params[COMPONENT], values, dtype, meta, shard_bytes, index={
                "_class_name": self.pipeline, "_diffusers_version": "0.36.0", "transformer": ["diffusers", CLASS],
                "text_encoder": ["transformers", "Qwen3Model"], "vae": ["diffusers", "AutoencoderKL"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]})
            return
        original = layout != "single-file-diffusers"
        prefix = "model.diffusion_model." if layout == "single-file-prefixed" else ""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tensors(path, _file_items(params[COMPONENT], values, prefix, original), dtype, meta)

    def diffusers_config(self) -> dict:
        """transformer/config.json (what ZImageTransformer2DModel(**...) takes, plus _class_name)."""
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
             if k not in ("variant", "pipeline")}
        return {"_class_name": CLASS, "_diffusers_version": "0.36.0", **d}

    def model_config(self) -> dict:
        """The config as keyword arguments of ZImageTransformer2DModel."""
        return {k: v for k, v in self.diffusers_config().items() if not k.startswith("_")}


def _file_items(params: Params, values: Values, prefix: str, original: bool) -> list:
    """A single file's tensors in parameter order: diffusers' names, or the original ones with each
    attention's q, k, v stacked into one `attention.qkv` (where to_q stood)."""
    items = []
    for name, shape in params:
        if not original:
            items.append((prefix + name, shape, (lambda n=name, s=shape: values(COMPONENT, n, s))))
            continue
        stem = name[: -len(".weight")]
        fused = fused_of(stem) if name.endswith(".weight") else None
        if fused is None:
            items.append((prefix + diffusers_to_original(name), shape,
                          (lambda n=name, s=shape: values(COMPONENT, n, s))))
        elif stem.endswith(QKV[0]):
            block = stem[: -len(QKV[0])]
            parts = [f"{block}{x}.weight" for x in QKV]
            items.append((f"{prefix}{fused}.weight", (3 * shape[0], shape[1]),
                          (lambda p=parts, s=shape: torch.cat([values(COMPONENT, n, s) for n in p]))))
    return items


# scale -> (blocks, refiner blocks, heads, head dim, rope axes (summing to head dim), caption width, latent)
SCALES = {"full": None, "small": (4, 2, 6, 128, (32, 48, 48), 1024, 16), "tiny": (2, 1, 2, 32, (8, 12, 12), 48, 4)}
PRESETS = {"z-image": ZImageConfig(), "z-image-turbo": ZImageConfig(variant="turbo")}  # prolora.synthetic.preset


def z_image_config(name: str = "z-image", scale: str = "full", blocks: int | None = None,
                   refiners: int | None = None) -> ZImageConfig:
    """A preset ("z-image", "z-image-turbo"; also "NAME:SCALE") at "full", "small" or "tiny" size,
    with `blocks` main blocks and `refiners` blocks in each refiner instead of the scale's."""
    if ":" in name:
        name, scale = name.split(":", 1)
    if name not in PRESETS:
        raise ValueError(f"unknown Z-Image preset {name!r}; choose one of {sorted(PRESETS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    cfg = PRESETS[name]
    if SCALES[scale] is not None:
        n, ref, heads, hd, axes, cap, latent = SCALES[scale]
        cfg = replace(cfg, n_layers=n, n_refiner_layers=ref, n_heads=heads, n_kv_heads=heads, dim=heads * hd,
                      axes_dims=axes, axes_lens=(64, 32, 32), cap_feat_dim=cap, in_channels=latent)
    if blocks is not None:
        cfg = replace(cfg, n_layers=int(blocks))
    if refiners is not None:
        cfg = replace(cfg, n_refiner_layers=int(refiners))
    return cfg


def preset(name: str, scale: str = "full") -> ZImageConfig:
    """prolora.synthetic.preset's hook."""
    return z_image_config(name, scale)


def z_image_params(cfg: ZImageConfig) -> Params:
    """(diffusers name, shape) of every ZImageTransformer2DModel parameter, in state_dict order."""
    d, hd, ada = cfg.dim, cfg.dim // cfg.n_heads, min(cfg.dim, ADALN)
    p = ParamList()
    if cfg.siglip_feat_dim:
        p.append(("siglip_pad_token", (1, d)))
    p += [("x_pad_token", (1, d)), ("cap_pad_token", (1, d))]
    patches = list(zip(cfg.all_patch_size, cfg.all_f_patch_size))
    for ps, fs in patches:
        p.linear(f"all_x_embedder.{ps}-{fs}", d, fs * ps * ps * cfg.in_channels)
    for ps, fs in patches:
        p.linear(f"all_final_layer.{ps}-{fs}.linear", ps * ps * fs * cfg.in_channels, d)
        p.linear(f"all_final_layer.{ps}-{fs}.adaLN_modulation.1", d, ada)

    def block(b: str, modulation: bool) -> None:
        p.extend([(f"{b}.attention.norm_q.weight", (hd,)), (f"{b}.attention.norm_k.weight", (hd,))])
        for x in ("to_q", "to_k", "to_v", "to_out.0"):
            p.linear(f"{b}.attention.{x}", d, d, bias=False)
        p.linear(f"{b}.feed_forward.w1", cfg.ffn, d, bias=False)
        p.linear(f"{b}.feed_forward.w2", d, cfg.ffn, bias=False)
        p.linear(f"{b}.feed_forward.w3", cfg.ffn, d, bias=False)
        p.extend([(f"{b}.{n}.weight", (d,)) for n in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2")])
        if modulation:
            p.linear(f"{b}.adaLN_modulation.0", 4 * d, ada)

    for i in range(cfg.n_refiner_layers):
        block(f"noise_refiner.{i}", True)
    for i in range(cfg.n_refiner_layers):
        block(f"context_refiner.{i}", False)
    p.linear("t_embedder.mlp.0", 1024, 256)
    p.linear("t_embedder.mlp.2", ada, 1024)
    p.append(("cap_embedder.0.weight", (cfg.cap_feat_dim,)))
    p.linear("cap_embedder.1", d, cfg.cap_feat_dim)
    if cfg.siglip_feat_dim:
        p.append(("siglip_embedder.0.weight", (cfg.siglip_feat_dim,)))
        p.linear("siglip_embedder.1", d, cfg.siglip_feat_dim)
        for i in range(cfg.n_refiner_layers):
            block(f"siglip_refiner.{i}", False)
    for i in range(cfg.n_layers):
        block(f"layers.{i}", True)
    return list(p)


def write_z_image_model(path: str | os.PathLike, config: ZImageConfig | str = "z-image:tiny",
                        layout: str = "diffusers", seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                        base: str | os.PathLike | BaseModel | None = None,
                        perturbation: Perturbation | float = Perturbation(), shard_bytes: int = 5 * 2**30,
                        device: str | None = None, threads: int | None = None) -> Path:
    """Write a synthetic Z-Image-shaped model at `path` in a layout of LAYOUTS; returns `path`.
    `base`: a model written earlier with the same layout sizes and seed; the result is then a
    TARGET (Turbo-like: each weight the base's plus `perturbation`)."""
    cfg = z_image_config(config) if isinstance(config, str) else config
    return write_model(path, cfg, layout, dtype, seed, base, perturbation, threads, shard_bytes, device)


# ----------------------------------------------------------------------------- LoRAs

# format -> the spelling written by default (model.py): musubi-tuner's kohya, diffusers' PEFT,
# ai-toolkit's diffusion_model. + diffusers names
_SPELLING = {"kohya": "kohya-diffusers", "peft": "peft", "comfy": "comfy"}
Rows = tuple[tuple[int, int], ...]


def z_image_lora_targets(modules, targets: str = "transformer"):
    """Canonical ids a LoRA of this kind adapts: "attn" (q, k, v, out of every block), "transformer"
    (every linear of the blocks: attention, feed_forward, adaLN_modulation; main blocks and
    refiners), "all" (also the embedders and the final layer)."""
    check_targets(targets)
    groups = tuple(f"{COMPONENT}.{g}." for g in ("layers", "noise_refiner", "context_refiner", "siglip_refiner"))
    for module in modules:
        if module.startswith(f"{COMPONENT}."):
            if chosen(targets, attn=".attention." in module, transformer=module.startswith(groups)):
                yield module


def write_z_image_lora(model: str | os.PathLike | BaseModel, path: str | os.PathLike, format: str = "kohya",
                       rank: int = 4, alpha: float | None = None, targets: str = "transformer", seed: int = 0,
                       size: float = 0.05, spelling: str | None = None, lora_ab: bool = False,
                       split_qkv: bool = False) -> Path:
    """Write a synthetic LoRA for a Z-Image model; returns `path`.

    format "kohya": musubi-tuner's `lora_unet_<diffusers path>` (spelling "kohya-ldm": ComfyUI's
    `lora_unet_<original path>` with each attention's fused `attention_qkv`, in kohya's split_qkv
    form with `split_qkv`, as musubi's ComfyUI converter writes it); "peft": diffusers'
    `transformer.<path>` with lora_adapter_metadata ("peft-bare": no prefix); "comfy":
    `diffusion_model.<diffusers path>` (`lora_ab`: ai-toolkit's lora_A / lora_B keys, no alpha;
    spelling "comfy-ldm": ComfyUI's own saves, original names and the fused attention).
    Each module's dW has Frobenius norm about `size` * sqrt(out); alpha defaults to rank / 2."""
    return write_synthetic_lora(model, path, format, rank, alpha, targets, seed, size=size, spelling=spelling,
                                lora_ab=lora_ab, split_qkv=split_qkv)


def write_lora_modules(m: BaseModel, format: str, rank: int, alpha: float, targets: str, seed: int, size: float,
                       spelling: str | None = None, lora_ab: bool = False, split_qkv: bool = False,
                       **_ignored: object) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """prolora.synthetic.write_lora's hook (see write_z_image_lora): one pair per key the spelling
    names; a fused attention key gets one down and an up whose row blocks are q's, k's and v's
    (block-diagonal under `split_qkv`)."""
    spelling = format_spelling(format, spelling, _SPELLING, "Z-Image", lora_ab)
    mods = fused_pairs(m, z_image_lora_targets(m.weights, targets), spelling, rank, alpha, seed, size, split_qkv)
    return mods, {"ss_base_model_version": "z_image"}


# ----------------------------------------------------------------------------- bench, conformance

# `prolora bench --family z-image`: Z-Image -> Z-Image-Turbo (the same layout); its LoRAs adapt the
# attention and feed-forward projections of the main blocks, as PEFT (diffusers' and ai-toolkit's
# names, split q/k/v: row slices of the single files' fused attention.qkv)
BENCH_LORA = ("peft", re.compile(r"^transformer\.layers\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|"
                                 r"feed_forward\.w[123])$"))


def bench_pair(name: str, width: float, depth: float) -> tuple[ZImageConfig, ZImageConfig]:
    """(source, target) configs: Z-Image and Z-Image-Turbo at full width (width 1: 3840) or the
    small preset, with `depth` of the 30 main blocks and of the 2 blocks of each refiner (at least
    one each)."""
    scale = "full" if width >= 1.0 else "small"
    full = z_image_config("z-image", scale)
    blocks, refiners = max(1, round(full.n_layers * depth)), max(1, round(full.n_refiner_layers * depth))
    return (z_image_config("z-image", scale, blocks, refiners), z_image_config("z-image-turbo", scale, blocks, refiners))


_FUSED_GAP = (f"diffusers' Z-Image converter splits a fused `{FUSED}` only from the `.lora.down` dot layout (which "
              "its `lora_unet_` keys become, `diffusion_model.` ones do not); ComfyUI reads these names")
CONFORMANCE = Conformance(
    pairs=(("z-image:tiny", "z-image-turbo:tiny"),),
    layouts=LAYOUTS,
    loras={"musubi": {"format": "kohya"},  # musubi-tuner / sd-scripts: lora_unet_layers_0_attention_to_q + alpha
           "kohya-comfy": {"format": "kohya", "spelling": "kohya-ldm", "split_qkv": True},  # musubi's ComfyUI converter
           "peft": {"format": "peft"},  # diffusers: transformer.layers.0.attention.to_q
           "peft-bare": {"format": "peft", "spelling": "peft-bare"},  # no prefix
           "comfy": {"format": "comfy"},  # diffusion_model. + diffusers names, lora_down / lora_up
           "ai-toolkit": {"format": "comfy", "lora_ab": True},  # diffusion_model. + lora_A / lora_B, no alpha
           "comfy-saved": {"format": "comfy", "spelling": "comfy-ldm"}},  # ComfyUI's saves: original names, fused qkv
    component=COMPONENT,
    model_classes={MEMBER: CLASS},
    pipelines={MEMBER: "ZImagePipeline"},
    dtype="bfloat16",
    rewritten={"peft-bare": "unprefixed PEFT keys are written back under `transformer.` (diffusers drops "
                            "unprefixed keys; diffusers and ComfyUI read prefixed ones)",
               "musubi": "musubi's kohya names are written back as ComfyUI's (fused attention_qkv, attention_out), "
                         "which ComfyUI and diffusers both read (model.py)"},
    loader_gaps={"comfy-saved": _FUSED_GAP},
)
