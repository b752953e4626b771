"""Qwen-Image and Qwen-Image-Edit (diffusers QwenImageTransformer2DModel; member "qwen-image"):
diffusers folders, single files (ComfyUI's, bare or under `model.diffusion_model.`) and modules
held in memory. Edit shares Qwen-Image's layout: only the pipeline class differs (the variant).

    keys.py       the transformer's names (canonical ids), prefixes, block layout, pipeline classes
    model.py      QwenModel: every LoRA spelling (musubi kohya, peft, ComfyUI / ai-toolkit)
    read.py       single files and diffusers folders (claim_file / claim_folder); Qwen-Image-2.1 refused
    memory.py     transformers and pipelines held in memory (claim_memory)
    rules.py      the LoRA hint (img_mlp / txt_mlp / img_mod / txt_mod names)
    synthetic.py  synthetic Qwen-Image models and LoRAs (imported on first use)

Refine has no Qwen-Image denoiser builder (it refuses Qwen-Image by name).
"""
from __future__ import annotations

from ..record import BenchPreset, Family
from .keys import MEMBER
from .memory import claim_memory
from .read import claim_file, claim_folder
from .rules import lora_hint

FAMILY = Family(
    name="qwen-image",
    members=(MEMBER,),
    title="Qwen-Image (and -Edit)",
    claim_file=claim_file,
    claim_folder=claim_folder,
    claim_memory=claim_memory,
    lora_hint=lora_hint,
    parts={"synthetic": "prolora.families.qwen_image.synthetic"},
    bench={"qwen-image": BenchPreset("bfloat16", "Qwen-Image -> Qwen-Image-Edit, bf16")},
)
