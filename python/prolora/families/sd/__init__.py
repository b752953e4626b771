"""Stable Diffusion UNet models: SD1.x, SD2.x, SDXL and SDXL's depth-pruned kin (SSD-1B, Vega,
KOALA), with their CLIP / OpenCLIP text encoders.

    detect.py     the member from the UNet's block structure and the encoders' widths
    unet_keys.py  the diffusers <-> LDM/SGM UNet key map, built from a file's own keys
    model.py      SdModel: canonical ids and every LoRA spelling (kohya, peft, ComfyUI)
    build.py      UNet components from a header, and the SdModel they make
    read.py       single files and diffusers folders (claim_file / claim_folder), the single-file plan
    memory.py     pipelines and models held in memory (claim_memory)
    rules.py      LoRA hints, the block layout matching reads, extract's base-model metadata
    synthetic.py  synthetic SD models (imported on first use)
    refine.py     the UNet denoiser and its conditioning for --refine (imported on first use)
"""
from __future__ import annotations

from ..record import BenchPreset, Family, Loader
from .memory import claim_memory
from .read import claim_file, claim_folder
from .rules import METADATA_HINTS, RELATED, block_of, lora_hint, lora_metadata

FAMILY = Family(
    name="sd",
    members=("sd1", "sd2", "sdxl", "ssd-1b", "vega", "koala"),
    title="Stable Diffusion 1.x / 2.x / XL (and SSD-1B, Vega, KOALA)",
    claim_file=claim_file,
    claim_folder=claim_folder,
    claim_memory=claim_memory,
    related=RELATED,
    formats=("kohya", "peft", "comfy", "diffusers-old"),
    lora_hint=lora_hint,
    metadata_hints=METADATA_HINTS,
    block_of=block_of,
    lora_metadata=lora_metadata,
    loader=Loader(format="kohya"),  # diffusers applies kohya alphas (tensors) exactly from a state dict
    parts={"synthetic": "prolora.families.sd.synthetic", "refine": "prolora.families.sd.refine"},
    bench={"sd15": BenchPreset(), "sdxl": BenchPreset(default=True), "ssd-1b": BenchPreset()},
)
