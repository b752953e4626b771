"""The Wan model: transformer weights by canonical id (`transformer.<diffusers path>`) and every
LoRA spelling of them.

LoRA spellings: peft `transformer.blocks.0.attn1.to_q` (diffusers, ai-toolkit), kohya-ldm
`lora_unet_blocks_0_self_attn_q` (musubi-tuner and kohya-style trainers), comfy
`diffusion_model.blocks.0.self_attn.q` (ComfyUI, DiffSynth; `lora_A/lora_B` accepted too);
kohya-diffusers `lora_transformer_<diffusers path>`. The kohya-ldm and comfy spellings use the
original Wan names (keys.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...checkpoints.model import BaseModel, _flat
from ...errors import ModelError
from .keys import BLOCK, COMPONENT


@dataclass(eq=False, repr=False)
class WanModel(BaseModel):
    """A Wan transformer (or both experts of a Wan 2.2 A14B folder). Weights are keyed
    `transformer.<diffusers path>` (a two-expert folder: the low-noise expert's `transformer_2.<...>`);
    `original` holds each one's original Wan name, which the kohya and ComfyUI spellings use."""

    original: dict[str, str] = field(default_factory=dict, repr=False)
    facts: dict = field(default_factory=dict, repr=False)
    LINEAR_ONLY: ClassVar[bool] = True  # every weight a linear: inspect counts no convs

    @property
    def kohya_spelling(self) -> str:
        """musubi-tuner writes original names (`lora_unet_blocks_0_self_attn_q`)."""
        return "kohya-ldm"

    @property
    def hidden(self) -> int | None:
        return self.facts.get("hidden")

    @property
    def experts(self) -> dict[str, str]:
        """expert label -> component, for a folder that holds both Wan 2.2 A14B experts; else {}."""
        return dict(self.facts.get("experts") or {})

    def spell(self, module: str, spelling: str) -> str:
        """peft `transformer.<path>`, kohya-ldm `lora_unet_<original path>`, comfy
        `diffusion_model.<original path>`, kohya-diffusers `lora_transformer_<path>`."""
        if module not in self.weights:
            raise ModelError(f"{self.path}: no weight '{module}' in this model")
        component, _, path = module.partition(".")
        if spelling == "peft":
            return module
        if spelling == "kohya-diffusers":
            return "lora_transformer_" + _flat(path)
        orig = self.original.get(module)
        if spelling in ("kohya-ldm", "comfy"):
            if orig is None or component != COMPONENT:
                raise ModelError(f"{self.path}: '{module}' has no original Wan name, so no '{spelling}' spelling")
            return ("lora_unet_" + _flat(orig)) if spelling == "kohya-ldm" else "diffusion_model." + orig
        raise ValueError(f"unknown spelling {spelling!r}")

    def _add_aliases(self, add) -> None:
        for module in self.weights:
            component, _, path = module.partition(".")
            if component != COMPONENT:  # the low-noise expert of a two-expert folder: no LoRA names
                continue
            add(module, module, "peft")
            add(path, module, "peft")  # a model-level save_lora_adapter file: written back under transformer.
            add("lora_transformer_" + _flat(path), module, "kohya-diffusers")
            orig = self.original.get(module)
            if orig is not None:
                add("lora_unet_" + _flat(orig), module, "kohya-ldm")
                add("diffusion_model." + orig, module, "comfy")

    def unspellable(self, module: str, spelling: str) -> str | None:
        if spelling in ("kohya-ldm", "comfy") and (module not in self.original
                                                   or not module.startswith(COMPONENT + ".")):
            return "no original Wan name for it (kohya / ComfyUI spell original names); write peft to keep it"
        return None

    def missing_hint(self, module: str) -> str | None:
        path = module.partition(".")[2]
        if ".attn2.add_" in module:
            return (f"{self.name} has no image cross-attention (k_img / v_img): only Wan 2.1 I2V has it, "
                    "not a text-to-video model")
        if path.startswith("condition_embedder.image_embedder."):
            return f"{self.name} has no CLIP image embedder (img_emb): only Wan 2.1 I2V has it"
        m = BLOCK.match(path)
        if m and self.facts.get("blocks") is not None and int(m.group(1)) >= self.facts["blocks"]:
            return f"{self.name} has {self.facts['blocks']} blocks (blocks.0 to blocks.{self.facts['blocks'] - 1})"
        return None

    @property
    def variant(self) -> str:
        """T2V / I2V / TI2V, with the size where the width is a published one (e.g. "T2V-14B")."""
        return str(self.facts.get("variant", "unknown"))
