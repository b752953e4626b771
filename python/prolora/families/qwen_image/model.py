"""Qwen-Image and Qwen-Image-Edit (diffusers QwenImageTransformer2DModel), family "qwen-image":
the layout, the files as distributed, and the model class with its LoRA spellings.

Layout (diffusers 0.42 models/transformers/transformer_qwenimage.py)
--------------------------------------------------------------------
An MMDiT of `num_layers` (60) dual-stream blocks at width h = heads * head dim (24 * 128 = 3072),
every linear separate (no fused q/k/v). Canonical ids are ``transformer.<diffusers path>``:

    transformer_blocks.N.img_mod.1 / txt_mod.1              [6h, h]   adaLN modulation (SiLU, Linear)
    transformer_blocks.N.attn.to_q / to_k / to_v             [h, h]    image stream
    transformer_blocks.N.attn.add_q_proj / add_k_proj / add_v_proj    text stream
    transformer_blocks.N.attn.to_out.0 / to_add_out          [h, h]
    transformer_blocks.N.img_mlp.net.0.proj / txt_mlp.net.0.proj   [4h, h]  (GELU-tanh FeedForward)
    transformer_blocks.N.img_mlp.net.2 / txt_mlp.net.2       [h, 4h]
    img_in [h, in_channels], txt_in [h, joint_attention_dim (3584, Qwen2.5-VL's width)],
    time_text_embed.timestep_embedder.linear_1 [h, 256] / linear_2 [h, h],
    norm_out.linear [2h, h], proj_out [patch^2 * out_channels, h]

(1-D parameters, the q/k RMSNorm scales and txt_norm, are no LoRA targets; the Layered variant's
`time_text_embed.addition_t_embedding` is an nn.Embedding table and is not read as a linear.)

Files as distributed
--------------------
- diffusers: a pipeline folder (model_index.json, transformer/ with config.json and sharded
  safetensors + index, text_encoder/ = Qwen2.5-VL, vae/), or the bare transformer/ folder.
- single files (ComfyUI's repackaged `qwen_image_bf16.safetensors`, `qwen_image_edit_*.safetensors`):
  the same diffusers names, bare or under `model.diffusion_model.` (a ComfyUI-saved checkpoint);
  diffusers' single-file loader maps QwenImageTransformer2DModel with the identity
  (loaders/single_file_model.py). Keys outside the transformer (an all-in-one file's text encoder
  or VAE) are not read. Qwen-Image-2.1 (QwenImage21Transformer2DModel: SwiGLU MLPs, no txt stream
  MLP, `txt_in.text_norm`) is another architecture and is refused by name.

Qwen-Image vs Qwen-Image-Edit
-----------------------------
Edit (and Edit-2509/-2511) use the same transformer class and the same weight names and shapes:
only the pipeline differs (model_index.json `_class_name` QwenImageEditPipeline /
QwenImageEditPlusPipeline), and the 2511 config adds flags that change no weight (`zero_cond_t`).
Both are family "qwen-image", transfers between them match every layer by name, and `variant`
says which one a folder is ("image", "edit", "edit-plus", "layered"; "unknown" for single files,
whose keys cannot tell).

LoRA spellings (what the trainers write; diffusers' _convert_non_diffusers_qwen_lora_to_diffusers
reads all but the unprefixed lora_A/B keys, and ComfyUI's Qwen-Image key map knows every prefix)
------------------------------------------------------------------------------
    peft        transformer.<path>.lora_A/lora_B     diffusers, ai-toolkit (diffusers save)
    comfy       diffusion_model.<path>.lora_down/up or .lora_A/B   ComfyUI-saved, ai-toolkit
    kohya-ldm   lora_unet_<path with _>.lora_down/up + .alpha       musubi-tuner
    (peft)      <path>.lora_A/lora_B, <path>.lora_A.default.weight  no prefix (DiffSynth-Studio)
Unprefixed PEFT keys are read as the peft spelling and written back under `transformer.`: diffusers
drops unprefixed keys without `.default.` (its prefix filter), while diffusers, ComfyUI
("transformer.{key}") and DiffSynth-Engine all read the prefixed ones. (`spell(..., "peft-bare")`
still names the bare key, for writing such inputs.)
Text-encoder (Qwen2.5-VL) LoRA modules are not transferred: the trainers do not adapt it by
default, and prolora reads the transformer only; such keys are dropped and named in the report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...checkpoints.model import BaseModel, _flat
from ...errors import ModelError
from .keys import BLOCK, COMPONENT, TEXT_ENCODER_KEYS


@dataclass(eq=False, repr=False)
class QwenModel(BaseModel):
    """A Qwen-Image / Qwen-Image-Edit transformer. Weights are keyed `transformer.<diffusers path>`
    (see the module doc); every LoRA spelling is that path with a prefix, so no module is fused."""

    facts: dict = field(default_factory=dict, repr=False)
    LINEAR_ONLY: ClassVar[bool] = True  # every weight a linear: inspect counts no convs
    variant: str = "unknown"

    @property
    def kohya_spelling(self) -> str:
        """musubi-tuner writes `lora_unet_` + the flattened diffusers path."""
        return "kohya-ldm"

    def spell(self, module: str, spelling: str) -> str:
        """peft `transformer.<path>`, peft-bare `<path>`, comfy `diffusion_model.<path>`, kohya
        (either kohya spelling) `lora_unet_<path with _>`."""
        if module not in self.weights:
            raise ModelError(f"{self.path}: no weight '{module}' in this model")
        path = module.partition(".")[2]
        if spelling == "peft":
            return module
        if spelling == "peft-bare":
            return path
        if spelling == "comfy":
            return "diffusion_model." + path
        if spelling in ("kohya-ldm", "kohya-diffusers"):
            return "lora_unet_" + _flat(path)
        if spelling == "xlabs":
            raise ModelError(f"{self.path}: '{module}' has no XLabs name (XLabs LoRAs exist for Flux only)")
        raise ValueError(f"unknown spelling {spelling!r}")

    def _add_aliases(self, add) -> None:
        for module in self.weights:
            path = module.partition(".")[2]
            add(module, module, "peft")
            add(path, module, "peft")  # bare: read, and written back under `transformer.` (see the module doc)
            add("diffusion_model." + path, module, "comfy")
            add("lora_unet_" + _flat(path), module, "kohya-ldm")

    def unspellable(self, module: str, spelling: str) -> str | None:
        if spelling == "xlabs":
            return "no XLabs name (XLabs LoRAs exist for Flux only); write kohya, comfy or peft"
        return None

    def missing_hint(self, module: str) -> str | None:
        component, _, path = module.partition(".")
        if component != COMPONENT:
            return f"{self.name} is read as its transformer only (the Qwen2.5-VL text encoder is not transferred)"
        m = BLOCK.match(path)
        n = self.facts.get("transformer_blocks")
        if m and n is not None and int(m.group(1)) >= n:
            return f"{self.name} has {n} transformer blocks, so no block {m.group(1)}"
        return None

    def unresolved_hint(self, lora_key: str) -> str | None:
        """Why a LoRA key names nothing here, where the key says (a text-encoder module)."""
        if lora_key.startswith(TEXT_ENCODER_KEYS):
            return ("a text-encoder (Qwen2.5-VL) module: prolora reads the Qwen-Image transformer only, so "
                    "text-encoder LoRA modules are not transferred")
        return None
