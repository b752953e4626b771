"""The interface every base-model reader provides (implementation: see the readers)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# How a LoRA file can spell a module of a base model. The readers of LoRA files keep a module's
# name exactly as the file writes it (minus the tensor suffix); the model resolves it.
#   kohya-ldm        lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q   (kohya SDXL)
#   kohya-diffusers  lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q (SD1.x)
#   peft             unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q
#   comfy            diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q
# Text encoders: kohya lora_te_ / lora_te1_ / lora_te2_ + flattened transformers name; peft
# text_encoder. / text_encoder_2.; comfy text_encoders.clip_l.transformer. / clip_g.
SPELLINGS = ("kohya-ldm", "kohya-diffusers", "peft", "comfy")


@dataclass(frozen=True)
class WeightRef:
    """Where one LoRA-able weight (linear or conv) of a base model lives.

    `module` is the canonical id: component + diffusers/transformers path of the module, e.g.
    ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` or
    ``text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj``.
    `rows` is a row range of the stored tensor for fused weights (OpenCLIP in_proj_weight).
    `shape` is the weight's own shape (after the row slice): (out, in) or (out, in, kh, kw).
    """

    module: str
    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str
    rows: tuple[int, int] | None = None
