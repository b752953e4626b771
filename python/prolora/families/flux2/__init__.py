"""FLUX.2 ([dev], [klein] 4B / 9B / 9B-KV, base and distilled; diffusers Flux2Transformer2DModel;
member "flux2"): BFL single files (bare or under ComfyUI's `model.diffusion_model.`), diffusers
folders (Flux2Pipeline / Flux2KleinPipeline) and modules held in memory. The [klein] base and its
distilled model share every shape per size, so a LoRA of one transfers onto the other; [klein] 4B
(width 3072), 9B (4096) and [dev] (6144) share no layer shape and are refused as a pair.

    keys.py       the BFL <-> diffusers tables, the fused weights and their slices (canonical ids),
                  strict BFL detection
    model.py      Flux2Model: every LoRA spelling (PEFT, kohya, ComfyUI / ai-toolkit), fused-slice tables
    read.py       single files and diffusers folders (claim_file / claim_folder)
    memory.py     transformers and pipelines held in memory (claim_memory)
    rules.py      telling FLUX.1 and FLUX.2 LoRAs apart, pair refusals, extract's metadata
    synthetic.py  synthetic FLUX.2 models and LoRAs, conformance and bench (imported on first use)

FLUX.1 shares the double_blocks / single_blocks names and is another family (flux/): a transfer
between them is refused naming both (rules.pair_refusal), and so is a FLUX.1 LoRA on a FLUX.2
model (rules.generation, which FLUX.1's LoRA hint asks too). Refine has no FLUX.2 denoiser builder.
"""
from __future__ import annotations

from ..record import BenchPreset, Family, Loader
from .keys import MEMBER
from .memory import claim_memory
from .read import claim_file, claim_folder
from .rules import METADATA_HINTS, lora_hint, lora_metadata, pair_refusal

FAMILY = Family(
    name=MEMBER,
    members=(MEMBER,),
    title="FLUX.2 ([dev], [klein])",
    claim_file=claim_file,
    claim_folder=claim_folder,
    claim_memory=claim_memory,
    lora_hint=lora_hint,
    metadata_hints=METADATA_HINTS,
    pair_refusal=pair_refusal,
    lora_metadata=lora_metadata,
    loader=Loader(),
    parts={"synthetic": "prolora.families.flux2.synthetic"},
    bench={"flux2-klein": BenchPreset("bfloat16", "FLUX.2 [klein] 4B base -> distilled, bf16")},
)
