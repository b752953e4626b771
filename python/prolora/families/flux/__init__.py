"""FLUX.1 (dev, schnell) and Chroma. (Transitional: the readers still live in checkpoints/flux.py.)"""
from __future__ import annotations

import re
from pathlib import Path

from ..record import BenchPreset, Family


def claim_file(path: Path, header):
    from ...checkpoints.flux import is_flux_keys, open_flux_single_file
    return open_flux_single_file(path, header) if is_flux_keys(header.tensors) is not None else None


def claim_folder(path: Path):
    from ...checkpoints.flux import is_flux_folder, open_flux_folder
    return open_flux_folder(path) if not (path / "unet").is_dir() and is_flux_folder(path) else None


_FLUX = re.compile(r"double_blocks|single_blocks|single_transformer_blocks|^lora_transformer_")


def lora_hint(lora):
    """("flux", how) when a LoRA's keys name FLUX.1 blocks (BFL or diffusers names)."""
    return ("flux", "Flux block names") if any(_FLUX.search(k) for k in lora.modules) else None


FAMILY = Family(name="flux", members=("flux", "chroma"), title="FLUX.1 (dev, schnell) and Chroma",
                claim_file=claim_file, claim_folder=claim_folder,
                related=frozenset({("flux", "chroma"), ("chroma", "flux")}),
                formats=("kohya", "peft", "comfy", "xlabs"), metadata_hints=(("flux", "flux"),), lora_hint=lora_hint,
                bench={"flux": BenchPreset("bfloat16", "FLUX.1-dev, bf16"),
                       "chroma": BenchPreset("bfloat16", "a FLUX.1-schnell source and a Chroma target derived from it, bf16")})
