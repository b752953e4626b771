"""Qwen-Image's names: the transformer's diffusers names are the canonical ids (no key map: every
spelling is that path with a prefix), the single files' prefixes, the block layout, and the
pipeline classes that tell Qwen-Image from -Edit."""
from __future__ import annotations

import re

MEMBER = "qwen-image"
COMPONENT = "transformer"
CLASS = "QwenImageTransformer2DModel"
# Qwen-Image-2.1: another layout (SwiGLU MLPs, no text-stream MLP), refused by name: its class, the
# key diffusers itself tells it by, and what the refusal says
V21_CLASS = "QwenImage21Transformer2DModel"
V21_KEYS = ("txt_in.text_norm.weight",)
V21_REFUSAL = ("a Qwen-Image-2.1 transformer (QwenImage21Transformer2DModel: SwiGLU MLPs, another layout than "
               "Qwen-Image's); prolora reads Qwen-Image / Qwen-Image-Edit only")
PREFIXES = ("model.diffusion_model.", "")
# the transformer's top-level modules: a bare single file's other keys (text encoder, VAE) are not its
TOP = ("img_in.", "txt_in.", "txt_norm.", "time_text_embed.", "transformer_blocks.", "norm_out.", "proj_out.")
# LoRA-able linears of one block, in model order
BLOCK_LINEARS = ("img_mod.1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                 "txt_mod.1", "txt_mlp.net.0.proj", "txt_mlp.net.2")
# model_index.json pipeline class -> variant
PIPELINES = {"QwenImagePipeline": "image", "QwenImageImg2ImgPipeline": "image", "QwenImageInpaintPipeline": "image",
             "QwenImageEditPipeline": "edit", "QwenImageEditInpaintPipeline": "edit",
             "QwenImageEditPlusPipeline": "edit-plus", "QwenImageLayeredPipeline": "layered"}
# LoRA key prefixes of text-encoder modules, in the trainers' spellings (kohya lora_te*, PEFT
# text_encoder., ComfyUI text_encoders.<name>.)
TEXT_ENCODER_KEYS = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoders.")

BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
