"""Flux2Model: a FLUX.2 transformer as prolora sees it: canonical ids (keys.py), every LoRA spelling
its trainers write, and the fused-slice tables.

Spellings
---------
    peft        transformer.<diffusers module>.lora_A/B      diffusers, SimpleTuner, ai-toolkit's diffusers save
    kohya-ldm   lora_unet_<BFL module with _>.lora_down/up + .alpha    kohya sd-scripts, musubi-tuner
    comfy       diffusion_model.<BFL module>.lora_down/up    ComfyUI; ai-toolkit writes the same keys with
                                                             lora_A/B and no alpha (read as comfy)

ComfyUI's loader maps `lora_unet_<flat>` and `diffusion_model.<module>` onto any model's BFL
state-dict names (comfy/lora.py, model_lora_keys_unet); diffusers' Flux2LoraLoaderMixin reads
kohya through _convert_kohya_flux2_lora_to_diffusers and `diffusion_model.` through
_convert_non_diffusers_flux2_lora_to_diffusers. A key of a fused weight (BFL's qkv, linear1,
img_mlp.0, the swapped final modulation; diffusers' to_qkv_mlp_proj and linear_in) adapts several
canonical slices: the plan cuts it per slice (resolve_fused) and writes the slices back into one
module (spell_fused; kohya's split_qkv block-diagonal form where their downs differ).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...checkpoints.model import BaseModel, FusedHit, Slice, _flat
from ...errors import ModelError
from .keys import D_DOUBLE, D_SINGLE, GUIDANCE, Place, Rows

# spelling -> (prefix, whether it spells BFL module names), for the transformer's modules
SPELLINGS = {"peft": ("transformer.", False), "kohya-ldm": ("lora_unet_", True), "comfy": ("diffusion_model.", True)}


def _key(spelling: str, path: str) -> str:
    prefix, _ = SPELLINGS[spelling]
    return prefix + (_flat(path) if spelling == "kohya-ldm" else path)


@dataclass(eq=False, repr=False)
class Flux2Model(BaseModel):
    """A FLUX.2 transformer. Weights are keyed `transformer.<canonical path>` (keys.py); `places`
    holds each one's BFL and diffusers place, which the spellings use."""

    places: dict[str, Place] = field(default_factory=dict, repr=False)
    facts: dict = field(default_factory=dict, repr=False)
    LINEAR_ONLY: ClassVar[bool] = True  # every weight a linear: inspect counts no convs
    variant: str = "unknown"
    _fused: dict[str, FusedHit] | None = field(default=None, repr=False)
    _fused_out: dict[tuple[str, str], tuple[str, int, Rows]] | None = field(default=None, repr=False)

    @property
    def kohya_spelling(self) -> str:
        """kohya's scripts write BFL names (`lora_unet_double_blocks_0_img_attn_qkv`)."""
        return "kohya-ldm"

    @property
    def hidden(self) -> int | None:
        return self.facts.get("hidden")

    def _whole(self, module: str, spelling: str) -> str | None:
        """The key of `module` in `spelling` where it is a whole module there, else None."""
        p = self.places.get(module)
        if p is None:
            return None
        bfl = SPELLINGS[spelling][1]
        if (p.bfl_rows if bfl else p.dif_rows) is not None:
            return None
        return _key(spelling, p.bfl if bfl else p.dif)

    def spell(self, module: str, spelling: str) -> str:
        """peft `transformer.<diffusers path>`, kohya (either spelling) `lora_unet_<BFL path with _>`,
        comfy `diffusion_model.<BFL path>`, for a module that is whole there (slices of a fused
        weight: spell_fused)."""
        if module not in self.weights:
            raise ModelError(f"{self.path}: no weight '{module}' in this model")
        if spelling == "kohya-diffusers":
            spelling = "kohya-ldm"
        if spelling not in SPELLINGS:
            if spelling == "xlabs":
                raise ModelError(f"{self.path}: '{module}' has no XLabs name (XLabs LoRAs exist for FLUX.1 only)")
            raise ValueError(f"unknown spelling {spelling!r}")
        key = self._whole(module, spelling)
        if key is None:
            raise ModelError(f"{self.path}: '{module}' is a slice of a fused weight; it has no whole '{spelling}' name")
        return key

    def _add_aliases(self, add) -> None:
        for module in self.weights:
            for spelling in SPELLINGS:
                key = self._whole(module, spelling)
                if key is not None:
                    add(key, module, spelling)

    def _fused_tables(self) -> dict[str, FusedHit]:
        """Fused LoRA keys -> FusedHit, and (module, spelling) -> (key, rows, the module's rows)."""
        if self._fused is not None:
            return self._fused
        groups: dict[tuple[str, str], list[tuple[str, Rows]]] = {}
        for module, p in self.places.items():
            if module not in self.weights:
                continue
            for spelling, (_, bfl) in SPELLINGS.items():
                rows = p.bfl_rows if bfl else p.dif_rows
                if rows is not None:
                    groups.setdefault((spelling, _key(spelling, p.bfl if bfl else p.dif)), []).append((module, rows))
        fused: dict[str, FusedHit] = {}
        out: dict[tuple[str, str], tuple[str, int, Rows]] = {}
        for (spelling, key), members in groups.items():
            total = sum(b - a for _, rows in members for a, b in rows)
            slices = tuple(Slice(m, rows) for m, rows in sorted(members, key=lambda x: min(a for a, _ in x[1])))
            fused[key] = FusedHit(spelling, total, slices)
            for s in slices:
                out[(s.module, spelling)] = (key, total, s.rows)
        self._fused, self._fused_out = fused, out
        return fused

    def resolve_fused(self, lora_key: str) -> FusedHit | None:
        return self._fused_tables().get(lora_key)

    def spell_fused(self, module: str, spelling: str) -> tuple[str, int, Rows] | None:
        self._fused_tables()
        return self._fused_out.get((module, "kohya-ldm" if spelling == "kohya-diffusers" else spelling))

    def unspellable(self, module: str, spelling: str) -> str | None:
        if spelling == "xlabs":
            return "no XLabs name (XLabs LoRAs exist for FLUX.1 only); write kohya, comfy or peft"
        return None

    def missing_hint(self, module: str) -> str | None:
        path = module.partition(".")[2]
        if path.startswith(GUIDANCE):
            return f"{self.name} has no guidance embedder (guidance_in): FLUX.2 [klein] is guidance-free, [dev] has one"
        for rx, what in ((D_DOUBLE, "double"), (D_SINGLE, "single")):
            m = rx.match(path)
            n = self.facts.get(f"{what}_blocks")
            if m and n is not None and int(m.group(1)) >= n:
                return f"{self.name} has {n} {what} blocks, so no block {m.group(1)}"
        return None

    def unresolved_hint(self, lora_key: str) -> str | None:
        if lora_key.startswith(("lora_te", "text_encoder", "text_encoders.")):
            return ("a text-encoder (Qwen3 / Mistral) module: prolora reads the FLUX.2 transformer only, so text-encoder "
                    "LoRA modules are not transferred")
        return None
