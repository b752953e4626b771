"""Z-Image (Base, Turbo; diffusers ZImageTransformer2DModel, member "z-image"): diffusers folders,
single files (ComfyUI's original names with the fused attention, or diffusers' names; bare or
under `model.diffusion_model.`) and modules held in memory. Turbo is Base distilled: the same
class, names and shapes, so a LoRA of one is moved onto the other layer by layer by name.

    keys.py       canonical ids <-> the original names (both ways), the fused attention, detection
    model.py      ZImageModel: every LoRA spelling (PEFT, ai-toolkit / ComfyUI, musubi and ComfyUI
                  kohya), the fused attention's slices, what a model lacks, its description
    read.py       single files and diffusers folders (claim_file / claim_folder)
    memory.py     transformers and pipelines held in memory (claim_memory)
    rules.py      the LoRA hint and the base-model metadata
    synthetic.py  synthetic Z-Image models and LoRAs, presets, the bench pair (imported on first use)

Lumina 2 (Lumina2Transformer2DModel) shares the original names but not the layout; it is never
claimed here (the `unsupported` package refuses it by name).
"""
from __future__ import annotations

from ..record import BenchPreset, Family
from .keys import MEMBER
from .memory import claim_memory
from .read import claim_file, claim_folder
from .rules import METADATA_HINTS, lora_hint


def lora_metadata(model) -> dict[str, str]:
    """modelspec / kohya ss_* entries naming Z-Image as the base of a LoRA extracted from `model`."""
    return {"modelspec.architecture": "Z-Image", "modelspec.implementation": "diffusers",
            "modelspec.resolution": "1024x1024", "ss_base_model_version": "z_image", "ss_v2": "False"}


FAMILY = Family(
    name=MEMBER,
    members=(MEMBER,),
    title="Z-Image (Base, Turbo)",
    claim_file=claim_file,
    claim_folder=claim_folder,
    claim_memory=claim_memory,
    lora_hint=lora_hint,
    metadata_hints=METADATA_HINTS,
    lora_metadata=lora_metadata,
    parts={"synthetic": "prolora.families.z_image.synthetic"},
    bench={MEMBER: BenchPreset("bfloat16", "Z-Image -> Z-Image-Turbo (same layout), bf16")},
)
