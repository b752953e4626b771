"""Wan's key maps: canonical ids (diffusers WanTransformer3DModel paths) <-> the original Wan
names, both ways, as tables.

Canonical ids
-------------
``transformer.<module path in diffusers' WanTransformer3DModel>``, e.g.
``transformer.blocks.3.attn1.to_q``. The original Wan code (and ComfyUI, musubi-tuner, most
trainers) names the same linears differently; the map is diffusers' own
(loaders/single_file_utils.convert_wan_transformer_to_diffusers and
lora_conversion_utils._convert_non_diffusers_wan_lora_to_diffusers):

    original (Wan, ComfyUI, musubi)        canonical (diffusers)
    blocks.N.self_attn.q / k / v / o       blocks.N.attn1.to_q / to_k / to_v / to_out.0
    blocks.N.cross_attn.q / k / v / o      blocks.N.attn2.to_q / to_k / to_v / to_out.0
    blocks.N.cross_attn.k_img / v_img      blocks.N.attn2.add_k_proj / add_v_proj    (2.1 I2V only)
    blocks.N.ffn.0 / ffn.2                 blocks.N.ffn.net.0.proj / ffn.net.2
    text_embedding.0 / .2                  condition_embedder.text_embedder.linear_1 / linear_2
    time_embedding.0 / .2                  condition_embedder.time_embedder.linear_1 / linear_2
    time_projection.1                      condition_embedder.time_proj
    head.head                              proj_out
    img_emb.proj.1 / .3                    condition_embedder.image_embedder.ff.net.0.proj / ff.net.2

Parameters that are no LoRA targets keep their own map for whole files: the q/k norms
(`self_attn.norm_q` -> `attn1.norm_q`, `cross_attn.norm_k_img` -> `attn2.norm_added_k`), the
cross-attention norm (original `norm3` is diffusers' `norm2`), the modulations (`blocks.N.modulation`
-> `blocks.N.scale_shift_table`, `head.modulation` -> `scale_shift_table`) and `patch_embedding`
(a Conv3d, never a LoRA target here).
"""
from __future__ import annotations

import re

COMPONENT = "transformer"
CLASS = "WanTransformer3DModel"  # the diffusers config's _class_name of a Wan transformer
# key prefixes of single files: ComfyUI-saved, ComfyUI's own, bare
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
TI2V_LATENT = 48  # channels of the Wan 2.2 VAE's latent (TI2V-5B); Wan 2.1's VAE has 16
# modules of architectures built on Wan's blocks that are not Wan (VACE's control blocks, Animate's
# motion encoder): a file holding them is not claimed, and families/unsupported refuses it by name
OTHER_ARCHITECTURES = ("vace_blocks.", "vace_patch_embedding.", "motion_encoder.")

# inside block N: original module -> diffusers module (LoRA targets)
BLOCK_LINEARS = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
GLOBAL_LINEARS = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
}
# other parameters (original -> diffusers, full parameter names), for whole files
BLOCK_OTHER = {
    "self_attn.norm_q.weight": "attn1.norm_q.weight", "self_attn.norm_k.weight": "attn1.norm_k.weight",
    "cross_attn.norm_q.weight": "attn2.norm_q.weight", "cross_attn.norm_k.weight": "attn2.norm_k.weight",
    "cross_attn.norm_k_img.weight": "attn2.norm_added_k.weight",
    "norm3.weight": "norm2.weight", "norm3.bias": "norm2.bias", "modulation": "scale_shift_table",
}
GLOBAL_OTHER = {
    "patch_embedding.weight": "patch_embedding.weight", "patch_embedding.bias": "patch_embedding.bias",
    "head.modulation": "scale_shift_table",
    "img_emb.proj.0.weight": "condition_embedder.image_embedder.norm1.weight",
    "img_emb.proj.0.bias": "condition_embedder.image_embedder.norm1.bias",
    "img_emb.proj.4.weight": "condition_embedder.image_embedder.norm2.weight",
    "img_emb.proj.4.bias": "condition_embedder.image_embedder.norm2.bias",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}

BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _translate(name: str, block: dict[str, str], other_block: dict[str, str], glob: dict[str, str],
               other_glob: dict[str, str]) -> str | None:
    """`name` through the tables: whole parameter names first (`other_*`), then module names with
    an optional `.weight` / `.bias` leaf (`block` inside blocks.N, `glob` outside)."""
    m = BLOCK.match(name)
    head, rest = (f"blocks.{m.group(1)}.", m.group(2)) if m else ("", name)
    whole, linears = (other_block, block) if m else (other_glob, glob)
    if rest in whole:
        return head + whole[rest]
    if rest in linears:
        return head + linears[rest]
    stem, _, leaf = rest.rpartition(".")
    if leaf in ("weight", "bias") and stem in linears:
        return f"{head}{linears[stem]}.{leaf}"
    return None


def original_to_diffusers(name: str) -> str | None:
    """The diffusers name of an original Wan parameter or module name (`blocks.0.self_attn.q.weight`,
    `blocks.0.self_attn.q`), or None if it has none."""
    return _translate(name, BLOCK_LINEARS, BLOCK_OTHER, GLOBAL_LINEARS, GLOBAL_OTHER)


def diffusers_to_original(name: str) -> str | None:
    """The inverse of `original_to_diffusers`."""
    return _translate(name, *_INVERSE)


_INVERSE = tuple({v: k for k, v in t.items()} for t in (BLOCK_LINEARS, BLOCK_OTHER, GLOBAL_LINEARS, GLOBAL_OTHER))
