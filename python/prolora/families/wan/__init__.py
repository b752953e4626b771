"""Wan text-to-video transformers (diffusers WanTransformer3DModel): Wan 2.1 (T2V / I2V, 14B and
1.3B), the two experts of Wan 2.2 A14B (member "wan") and Wan 2.2 TI2V-5B (member "wan-ti2v"), as
diffusers folders, single files (original or diffusers keys) and modules held in memory.

    keys.py       canonical ids (diffusers paths) <-> original Wan names, both ways, as tables
    model.py      WanModel: every LoRA spelling (peft, musubi kohya, ComfyUI, kohya-diffusers)
    read.py       single files and diffusers folders (claim_file / claim_folder), structure facts
    memory.py     transformers and pipelines held in memory (claim_memory)
    experts.py    Wan 2.2 A14B's high-noise and low-noise experts (the `experts` hook)
    rules.py      LoRA hints, related members, the pairs refused (two experts, other widths)
    pad.py        zero-delta padding diffusers' musubi-tuner converter needs (`pad_output`)
    synthetic.py  synthetic Wan models and LoRAs (imported on first use)

A transfer between Wan models of other widths (TI2V-5B vs a 14B layout) is refused with the reason
unless `--widths lstsq` is asked for. Refine has no Wan denoiser builder (it refuses Wan by name).
"""
from __future__ import annotations

from ..record import Family, Loader
from .experts import EXPERTS, experts_of
from .memory import claim_memory
from .pad import pad_musubi_blocks
from .read import claim_file, claim_folder
from .rules import METADATA_HINTS, RELATED, lora_hint, pair_refusal

FAMILY = Family(
    name="wan",
    members=("wan", "wan-ti2v"),
    title="Wan 2.1 / 2.2",
    claim_file=claim_file,
    claim_folder=claim_folder,
    claim_memory=claim_memory,
    related=RELATED,
    lora_hint=lora_hint,
    metadata_hints=METADATA_HINTS,
    pair_refusal=pair_refusal,
    pad_output=pad_musubi_blocks,
    experts=experts_of,
    loader=Loader(experts=EXPERTS, expert_kwargs={EXPERTS["low_noise"]: {"load_into_transformer_2": True}}),
    parts={"synthetic": "prolora.families.wan.synthetic"},
)
