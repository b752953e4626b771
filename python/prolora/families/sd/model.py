"""The SD-family model: UNet and CLIP weights by canonical id (diffusers / transformers paths),
and every spelling LoRA files use for them."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...checkpoints.model import BaseModel, _flat
from ...errors import ModelError
from .detect import SDXL_KIN, unet_stats
from .unet_keys import UnetStructure

# How a LoRA file can spell a module of a base model. The readers of LoRA files keep a module's
# name exactly as the file writes it (minus the tensor suffix); the model resolves it.
#   kohya-ldm        lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q   (kohya SDXL)
#   kohya-diffusers  lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q (SD1.x)
#   peft             unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q
#   comfy            diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q
# Text encoders: kohya lora_te_ / lora_te1_ / lora_te2_ + flattened transformers name; peft
# text_encoder. / text_encoder_2.; comfy text_encoders.clip_l.transformer. / clip_g.
SPELLINGS = ("kohya-ldm", "kohya-diffusers", "peft", "comfy")
KOHYA = ("kohya-ldm", "kohya-diffusers")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")



@dataclass(eq=False, repr=False)
class SdModel(BaseModel):
    """An SD1.x / SD2.x / SDXL-kin model (or text encoders alone): `ldm_names` maps each UNet
    module id to its LDM/SGM path (the kohya-ldm and ComfyUI spellings use it)."""

    ldm_names: dict[str, str] = field(default_factory=dict, repr=False)  # unet module id -> LDM/SGM module path
    structure: UnetStructure | None = field(default=None, repr=False)

    @property
    def kohya_spelling(self) -> str:
        """The UNet spelling kohya's own scripts write for this family."""
        return "kohya-ldm" if self.family in SDXL_KIN else "kohya-diffusers"

    def _two_encoders(self) -> bool:
        return self.family in SDXL_KIN or "text_encoder_2" in self.text_encoders

    def _comfy_clip(self, component: str) -> str:
        if component == "text_encoder_2":
            return "clip_g"
        return "clip_h" if self.family == "sd2" else "clip_l"

    def spell(self, module: str, spelling: str) -> str:
        """The LoRA module key for canonical `module` in `spelling` (inverse of `resolve`)."""
        if spelling not in SPELLINGS:
            raise ValueError(f"unknown spelling {spelling!r}; expected one of {SPELLINGS}")
        if module not in self.weights:
            raise ModelError(f"{self.path}: no weight '{module}' in this model")
        component, _, path = module.partition(".")
        if spelling == "peft":
            return module
        if component == "unet":
            ldm = self.ldm_names.get(module)
            if ldm is None and spelling != "kohya-diffusers":
                raise ModelError(f"{self.path}: '{module}' has no LDM/SGM name, so no '{spelling}' spelling")
            if spelling == "kohya-ldm":
                return "lora_unet_" + _flat(ldm)
            if spelling == "kohya-diffusers":
                return "lora_unet_" + _flat(path)
            return "diffusion_model." + ldm
        if spelling in KOHYA:
            if component == "text_encoder_2":
                return "lora_te2_" + _flat(path)
            return ("lora_te1_" if self._two_encoders() else "lora_te_") + _flat(path)
        return f"text_encoders.{self._comfy_clip(component)}.transformer.{path}"


    def _add_aliases(self, add) -> None:
        """Register every key a LoRA file may spell a module of this model with:
        add(alias, module, spelling). UNet: diffusers, LDM/SGM (kohya, ComfyUI) names; CLIP: kohya te/te1/te2, peft, ComfyUI."""
        for module in self.weights:
            component, _, path = module.partition(".")
            add(module, module, "peft")
            if component == "unet":
                ldm = self.ldm_names.get(module)
                add("lora_unet_" + _flat(path), module, "kohya-diffusers")
                if ldm is not None:
                    add("lora_unet_" + _flat(ldm), module, "kohya-ldm")
                    add("diffusion_model." + ldm, module, "comfy")
            elif path.startswith("text_model."):  # transformers 5 CLIPTextModel names lack it
                add(f"{component}.{path[len('text_model.'):]}", module, "peft")
            if component == "text_encoder":
                for prefix in ("lora_te_", "lora_te1_"):
                    add(prefix + _flat(path), module, self.kohya_spelling)
                for clip in ("clip_l", "clip_h"):
                    add(f"text_encoders.{clip}.transformer.{path}", module, "comfy")
            elif component == "text_encoder_2":
                add("lora_te2_" + _flat(path), module, self.kohya_spelling)
                add(f"text_encoders.clip_g.transformer.{path}", module, "comfy")


    def describe(self) -> dict:
        """Facts for `prolora inspect`: family, layout, files, per-component counts, dtypes, blocks."""
        st = unet_stats({m: r.shape for m, r in self.weights.items()})
        return {
            **super().describe(),
            "cross_attention_dim": st.cross_dim,
            "transformer_blocks": {
                "down": [sum(d) for d in st.down_depths],
                "mid": sum(st.mid_depths),
                "up": [sum(d) for d in st.up_depths],
                "total": st.total_blocks,
            },
        }
