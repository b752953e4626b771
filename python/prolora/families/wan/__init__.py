"""Wan 2.1 / 2.2. (Transitional: the readers still live in checkpoints/wan.py.)"""
from __future__ import annotations

import re
from pathlib import Path

from ..record import Family


def claim_file(path: Path, header):
    from .read import open_wan_single_file, wan_prefix
    return open_wan_single_file(path, header) if wan_prefix(header.tensors) is not None else None


def claim_folder(path: Path):
    from .read import is_wan_folder, open_wan_folder
    return open_wan_folder(path) if not (path / "unet").is_dir() and is_wan_folder(path) else None


def pair_refusal(source, target, widths):
    from .read import pair_refusal as refusal
    return refusal(source, target, widths)


def pad_output(modules, fmt, model):
    from .read import pad_musubi_blocks
    return pad_musubi_blocks(modules, fmt, model)


# original names (musubi lora_unet_blocks_0_self_attn_q, ComfyUI diffusion_model.blocks.0.ffn.0) or
# diffusers ones (transformer.blocks.0.attn1.to_q, .ffn.net.0.proj); SD's are transformer_blocks.N
_WAN = re.compile(r"(?:^|[._])(?<!transformer_)blocks[._]\d+[._](?:self_attn|cross_attn|ffn|attn[12][._]to_)")


def lora_hint(lora):
    """("wan", how) when a LoRA's keys name Wan blocks."""
    keys = list(lora.modules)
    if any(_WAN.search(k) for k in keys) and not any("transformer_blocks" in k for k in keys):
        return "wan", "Wan block names"
    return None


FAMILY = Family(name="wan", members=("wan", "wan-ti2v"), title="Wan 2.1 / 2.2",
                claim_file=claim_file, claim_folder=claim_folder,
                related=frozenset({("wan", "wan-ti2v"), ("wan-ti2v", "wan")}),
                pair_refusal=pair_refusal, pad_output=pad_output, metadata_hints=(("wan", "wan"),), lora_hint=lora_hint)
