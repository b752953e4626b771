"""Z-Image's names: canonical ids (diffusers ZImageTransformer2DModel paths) <-> the original names
of the single files ComfyUI distributes and reads, both ways, as tables; the fused attention's
slices; the block layout; strict detection of a single file's keys.

Canonical ids
-------------
``transformer.<module path in diffusers' ZImageTransformer2DModel>``, e.g.
``transformer.layers.3.attention.to_q`` or ``transformer.all_x_embedder.2-1``. The original Z-Image
files (ComfyUI's `z_image_turbo_bf16.safetensors`, and what ComfyUI's own LoRA tools save) name the
same linears differently and fuse each attention's q, k and v into one weight; the map is
diffusers' own (loaders/single_file_utils.convert_z_image_transformer_checkpoint_to_diffusers) and
ComfyUI's (comfy/utils.py z_image_to_diffusers, Comfy-Org/ComfyUI 09708eae):

    original (ComfyUI, single files)       canonical (diffusers)                           rows
    <block>.attention.qkv                  <block>.attention.to_q / to_k / to_v            [0,h) [h,2h) [2h,3h)
    <block>.attention.out                  <block>.attention.to_out.0
    <block>.attention.q_norm / k_norm      <block>.attention.norm_q / norm_k   (no LoRA targets)
    x_embedder                             all_x_embedder.2-1
    final_layer.linear                     all_final_layer.2-1.linear
    final_layer.adaLN_modulation.1         all_final_layer.2-1.adaLN_modulation.1
    everything else                        the same name (feed_forward.w1/w2/w3, adaLN_modulation.0,
                                           t_embedder.mlp.0/2, cap_embedder.0/1, norms, pad tokens)

<block> is `layers.N` (30 main blocks), `noise_refiner.N` / `context_refiner.N` (2 each; the
context refiner has no adaLN_modulation) and, in Z-Image-Omni only, `siglip_refiner.N`. h is the
width (3840), read from the weights, so tiny models work the same.
"""
from __future__ import annotations

import re

MEMBER = "z-image"
COMPONENT = "transformer"
CLASS = "ZImageTransformer2DModel"
# the pipelines that hold a ZImageTransformer2DModel (model_index.json `_class_name`)
PIPELINES = ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline", "ZImageOmniPipeline",
             "ZImageControlNetPipeline", "ZImageControlNetInpaintPipeline")
# single files: ComfyUI-saved (model.diffusion_model.) or bare
PREFIXES = ("model.diffusion_model.", "")
# the transformer's top-level modules (both namings); a file's other keys (text encoder, VAE) are not its
TOP = ("all_x_embedder.", "all_final_layer.", "x_embedder.", "final_layer.", "noise_refiner.", "context_refiner.",
       "siglip_refiner.", "layers.", "t_embedder.", "cap_embedder.", "siglip_embedder.")
# the transformer's parameters that are no module's (pad tokens; Lumina's unused norm_final)
OTHER = ("x_pad_token", "cap_pad_token", "siglip_pad_token", "norm_final.")
BLOCK_GROUPS = ("noise_refiner", "context_refiner", "siglip_refiner", "layers")  # in model order
BLOCK = re.compile(r"^(noise_refiner|context_refiner|siglip_refiner|layers)\.(\d+)\.(.+)$")
# LoRA-able linears of one block, in model order (context / siglip refiners have no adaLN_modulation)
BLOCK_LINEARS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
                 "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")
QKV = ("attention.to_q", "attention.to_k", "attention.to_v")

# original <-> diffusers, as data (read both ways): modules outside the blocks, modules inside a
# block, and parameters that are no LoRA targets (full parameter names, for whole files)
PATCH = "2-1"  # the one patch size (2) and frame patch size (1) the released models have
TOP_MODULES = {"x_embedder": f"all_x_embedder.{PATCH}", "final_layer.linear": f"all_final_layer.{PATCH}.linear",
               "final_layer.adaLN_modulation.1": f"all_final_layer.{PATCH}.adaLN_modulation.1"}
BLOCK_MODULES = {"attention.out": "attention.to_out.0"}
BLOCK_PARAMS = {"attention.q_norm.weight": "attention.norm_q.weight", "attention.k_norm.weight": "attention.norm_k.weight"}
FUSED = "attention.qkv"  # the original files' fused attention: q, k, v stacked by rows
# Lumina 2 shares the original names but is another model (adaLN_modulation.1, GQA attention):
# what tells a Z-Image file is diffusers' own marker, its blocks' adaLN_modulation.0 (no SiLU)
MARKER = "layers.0.adaLN_modulation.0.weight"
# LoRA key prefixes of text-encoder (Qwen3) modules, in the trainers' spellings
TEXT_ENCODER_KEYS = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoders.")


def _inverse(table: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


_TOP_BACK, _BLOCK_BACK, _PARAMS_BACK = _inverse(TOP_MODULES), _inverse(BLOCK_MODULES), _inverse(BLOCK_PARAMS)


def _translate(name: str, top: dict[str, str], block: dict[str, str], params: dict[str, str]) -> str:
    """`name` (a module or parameter name) through the tables; unchanged where they name nothing."""
    m = BLOCK.match(name)
    head, rest = (f"{m.group(1)}.{m.group(2)}.", m.group(3)) if m else ("", name)
    if m and rest in params:
        return head + params[rest]
    table = block if m else top
    if rest in table:
        return head + table[rest]
    stem, _, leaf = rest.rpartition(".")
    if leaf in ("weight", "bias") and stem in table:
        return f"{head}{table[stem]}.{leaf}"
    return head + rest


def original_to_diffusers(name: str) -> str:
    """The diffusers name of an original module or parameter name (not the fused qkv: see
    `fused_slices`)."""
    return _translate(name, TOP_MODULES, BLOCK_MODULES, BLOCK_PARAMS)


def diffusers_to_original(name: str) -> str:
    """The original name of a diffusers module or parameter name; q / k / v have none of their
    own (they are rows of `<block>.attention.qkv`)."""
    return _translate(name, _TOP_BACK, _BLOCK_BACK, _PARAMS_BACK)


def fused_of(path: str) -> str | None:
    """`<block>.attention.qkv` for a diffusers path `<block>.attention.to_q / to_k / to_v`, else None."""
    m = BLOCK.match(path)
    if m and m.group(3) in QKV:
        return f"{m.group(1)}.{m.group(2)}.{FUSED}"
    return None


def is_z_image_keys(keys, shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[str, str] | None:
    """(prefix, naming) under which a single file's `keys` hold a ZImageTransformer2DModel, else
    None: prefix "model.diffusion_model." or "", naming "original" (fused attention.qkv, ComfyUI's
    files) or "diffusers". Told by diffusers' marker (a main block's adaLN_modulation.0) beside
    the caption embedder and an attention of either naming; with `shapes`, the fused qkv must also
    have 3 x the width's rows (Lumina 2's grouped attention does not)."""
    keys = set(keys)
    for prefix in PREFIXES:
        if prefix + MARKER not in keys or prefix + "cap_embedder.1.weight" not in keys:
            continue
        if prefix + f"layers.0.{FUSED}.weight" in keys:
            if shapes is not None:
                qkv, cap = shapes[prefix + f"layers.0.{FUSED}.weight"], shapes[prefix + "cap_embedder.1.weight"]
                if len(qkv) != 2 or qkv[0] != 3 * cap[0] or qkv[1] != cap[0]:
                    continue
            return prefix, "original"
        if prefix + "layers.0.attention.to_q.weight" in keys:
            return prefix, "diffusers"
    return None
