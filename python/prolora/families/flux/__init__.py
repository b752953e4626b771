"""FLUX.1 (dev, schnell) and Chroma: BFL single files (bare or ComfyUI-prefixed, with the CLIP-L / T5
an all-in-one file carries), diffusers folders and modules in memory.

    keys.py       the BFL <-> diffusers tables (both ways), XLabs names, strict BFL detection, the
                  whole-file plan (writers, refine)
    model.py      FluxModel: canonical ids and every LoRA spelling (PEFT, kohya, ComfyUI, XLabs),
                  fused-slice tables, what a model lacks, its description
    chroma.py     what Chroma lacks of FLUX.1, and which member a model is
    read.py       single files and diffusers folders (claim_file / claim_folder)
    memory.py     pipelines and transformers held in memory (claim_memory)
    rules.py      LoRA hints and extract's base-model metadata
    xlabs.py      the two XLabs keys ComfyUI's reader requires (zero-delta padding, or a warning)
    synthetic.py  synthetic FLUX.1 / Chroma models and LoRAs (imported on first use)
    refine.py     the Flux denoiser for --refine (imported on first use)

FLUX.2 (Flux2Transformer2DModel, BFL files with a shared double_stream_modulation) shares the
block names and is never claimed here: it is its own family (families/flux2/), and rules.lora_hint
asks flux2.rules.generation to tell the two generations' LoRAs apart.
"""
from __future__ import annotations

from ..record import BenchPreset, Family, Loader
from .chroma import CHROMA, FLUX
from .memory import claim_memory
from .read import claim_file, claim_folder
from .rules import METADATA_HINTS, RELATED, lora_hint, lora_metadata


def pad_output(modules, fmt, model):
    from .xlabs import pad_output as pad
    return pad(modules, fmt, model)


FAMILY = Family(
    name="flux",
    members=(FLUX, CHROMA),
    title="FLUX.1 (dev, schnell) and Chroma",
    claim_file=claim_file,
    claim_folder=claim_folder,
    claim_memory=claim_memory,
    pad_output=pad_output,  # the two XLabs keys ComfyUI requires, as zero-delta modules
    related=RELATED,
    formats=("kohya", "peft", "comfy", "xlabs"),
    member_formats={CHROMA: ("kohya", "peft", "comfy")},  # XLabs LoRAs exist for FLUX.1 only
    lora_hint=lora_hint,
    metadata_hints=METADATA_HINTS,
    lora_metadata=lora_metadata,
    loader=Loader(alpha_keys=True),  # PEFT with alpha entries: diffusers folds kohya Flux alphas into fp16
    parts={"synthetic": "prolora.families.flux.synthetic", "refine": "prolora.families.flux.refine"},
    bench={FLUX: BenchPreset("bfloat16", "FLUX.1-dev, bf16"),
           CHROMA: BenchPreset("bfloat16", "a FLUX.1-schnell source and a Chroma target derived from it, bf16")},
)
