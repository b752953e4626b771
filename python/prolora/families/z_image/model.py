"""ZImageModel: a Z-Image transformer as prolora sees it (canonical ids, every LoRA spelling, the
fused attention's slices, what a model lacks, its description). Key maps in keys.py, readers in
read.py.

LoRA spellings
--------------
What the trainers and tools write, and who reads it (diffusers 0.42's ZImageLoraLoaderMixin and
_convert_non_diffusers_z_image_lora_to_diffusers; ComfyUI's comfy/lora.py (Comfy-Org/ComfyUI
17358c8f): its `Lumina2` branch maps diffusers names under `diffusion_model.`, `transformer.` and
bare onto its fused model, its generic branch `lora_unet_` / `diffusion_model.` + its own, original
names):

    spelling            example key stem                                    written by                  read by
    peft                transformer.layers.0.attention.to_q                 diffusers                   diffusers, ComfyUI
    (peft, bare)        layers.0.attention.to_q                             -                           ComfyUI
    comfy               diffusion_model.layers.0.attention.to_q             ai-toolkit (lora_A/B)       diffusers, ComfyUI
    comfy-ldm           diffusion_model.layers.0.attention.qkv / .out       ComfyUI's LoRA saves        ComfyUI
    kohya-ldm           lora_unet_layers_0_attention_qkv / _attention_out   musubi's ComfyUI converter  ComfyUI, diffusers
    (kohya-ldm, read)   lora_unet_layers_0_attention_to_q / _to_out_0       musubi-tuner, sd-scripts    diffusers

diffusers' converter turns a `lora_unet_` key into dotted names, `lora_down` included, so a fused
`..._attention_qkv.lora_down.weight` reaches its `.lora.down` branch, which splits the fused up into
q, k, v over the shared down (exact for kohya's split_qkv block-diagonal layout), and
`_attention_out` becomes `to_out.0`: ComfyUI's kohya names load in both loaders for every block
module, and are what every kohya output is written in (musubi's names are read and written back so;
the two differ only in the attention's names). Only the embedder and the final layer
(`lora_unet_x_embedder`, `lora_unet_final_layer_*`, which the trainers do not adapt by default) are
ComfyUI's alone there. Bare PEFT keys are written back under `transformer.` (diffusers drops bare
keys). The other spellings are written back as read: `comfy` (read by both) stays split, `comfy-ldm`
(ComfyUI's own saves) keeps the fused attention. `--format comfy` writes `comfy`. Names the two
namings share (feed_forward.w1/w2/w3, adaLN_modulation.0, t_embedder, cap_embedder) are spelled
alike either way.

Fused attention: subspaces per slice
------------------------------------
As FLUX.1's qkv (see families/flux/model.py and docs/method.md "Fused weights"): q, k and v are
separate canonical modules (row slices of the fused weight in an original single file), bases are
computed per slice, and a LoRA on the fused `attention.qkv` (kohya-ldm, comfy-ldm) is cut into one
part per slice and put back together on writing (with its common down, or kohya's split_qkv
block-diagonal layout, which musubi's converter writes and ComfyUI reads).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...checkpoints.model import BaseModel, FusedHit, Slice, _flat
from ...errors import ModelError
from .keys import BLOCK, COMPONENT, FUSED, QKV, TEXT_ENCODER_KEYS, diffusers_to_original, fused_of

Rows = tuple[tuple[int, int], ...]
# fused spellings: the LoRA key of a block's fused attention
_FUSED_KEY = {"kohya-ldm": lambda fused: "lora_unet_" + _flat(fused), "comfy-ldm": lambda fused: "diffusion_model." + fused}


@dataclass(eq=False, repr=False)
class ZImageModel(BaseModel):
    """A Z-Image (Base, Turbo, Omni) transformer. Weights are keyed `transformer.<diffusers path>`
    (see keys.py); the original files' fused attention is read as its three row slices."""

    facts: dict = field(default_factory=dict, repr=False)
    LINEAR_ONLY: ClassVar[bool] = True  # every weight a linear: inspect counts no convs
    _fused: dict[str, FusedHit] | None = field(default=None, repr=False)
    _fused_out: dict[tuple[str, str], tuple[str, int, Rows]] | None = field(default=None, repr=False)

    @property
    def kohya_spelling(self) -> str:
        """What `--format kohya` writes: ComfyUI's kohya names (original, fused attention)."""
        return "kohya-ldm"

    def spell(self, module: str, spelling: str) -> str:
        """The LoRA key of a module spelled whole (slices of the fused attention in kohya-ldm /
        comfy-ldm: see `spell_fused`)."""
        if module not in self.weights:
            raise ModelError(f"{self.path}: no weight '{module}' in this model")
        path = module.partition(".")[2]
        if spelling == "peft":
            return module
        if spelling == "peft-bare":
            return path
        if spelling == "comfy":
            return "diffusion_model." + path
        if spelling == "kohya-diffusers":
            return "lora_unet_" + _flat(path)
        if spelling in ("kohya-ldm", "comfy-ldm"):
            if fused_of(path) is not None:
                if spelling == "kohya-ldm":  # the slice's own kohya name is musubi's (the plan writes the
                    return "lora_unet_" + _flat(path)  # slices of kohya-ldm through spell_fused: fused)
                raise ModelError(f"{self.path}: '{module}' is a slice of the fused {FUSED}; it has no whole "
                                 f"'{spelling}' name")
            original = diffusers_to_original(path)
            return ("lora_unet_" + _flat(original)) if spelling == "kohya-ldm" else "diffusion_model." + original
        if spelling == "xlabs":
            raise ModelError(f"{self.path}: '{module}' has no XLabs name (XLabs LoRAs exist for Flux only)")
        raise ValueError(f"unknown spelling {spelling!r}")

    def _add_aliases(self, add) -> None:
        for module in self.weights:
            path = module.partition(".")[2]
            add(module, module, "peft")
            add(path, module, "peft")  # bare: read, written back under `transformer.` (diffusers drops bare keys)
            add("diffusion_model." + path, module, "comfy")
            add("lora_unet_" + _flat(path), module, "kohya-ldm")  # musubi's names: written back as ComfyUI's
            if fused_of(path) is None:
                original = diffusers_to_original(path)
                if original != path:  # shared names keep the spellings above: both spell them alike
                    add("diffusion_model." + original, module, "comfy-ldm")
                    add("lora_unet_" + _flat(original), module, "kohya-ldm")

    def _fused_tables(self) -> dict[str, FusedHit]:
        """Fused LoRA keys -> FusedHit, and (module, spelling) -> (key, rows, the module's rows)."""
        if self._fused is not None:
            return self._fused
        blocks: dict[str, list[str]] = {}
        for module in self.weights:
            fused = fused_of(module.partition(".")[2])
            if fused is not None:
                blocks.setdefault(fused, []).append(module)
        fused_hits: dict[str, FusedHit] = {}
        out: dict[tuple[str, str], tuple[str, int, Rows]] = {}
        for fused, members in blocks.items():
            if len(members) != 3:  # a block without all of q, k, v (a partial model) has no fused name
                continue
            members.sort(key=lambda m: QKV.index(BLOCK.match(m.partition(".")[2]).group(3)))  # q, k, v: row order
            slices, at = [], 0
            for m in members:
                rows = self.weights[m].shape[0]
                slices.append(Slice(m, ((at, at + rows),)))
                at += rows
            for spelling, key_of in _FUSED_KEY.items():
                key = key_of(fused)
                fused_hits[key] = FusedHit(spelling, at, tuple(slices))
                for s in slices:
                    out[(s.module, spelling)] = (key, at, s.rows)
        self._fused, self._fused_out = fused_hits, out
        return fused_hits

    def resolve_fused(self, lora_key: str) -> FusedHit | None:
        return self._fused_tables().get(lora_key)

    def spell_fused(self, module: str, spelling: str) -> tuple[str, int, Rows] | None:
        self._fused_tables()
        return self._fused_out.get((module, spelling))

    def unspellable(self, module: str, spelling: str) -> str | None:
        if spelling == "xlabs":
            return "no XLabs name (XLabs LoRAs exist for Flux only); write kohya, comfy or peft"
        return None

    def missing_hint(self, module: str) -> str | None:
        component, _, path = module.partition(".")
        if component != COMPONENT:
            return f"{self.name} is read as its transformer only (the Qwen3 text encoder is not transferred)"
        m = BLOCK.match(path)
        if m:
            n = self.facts.get(m.group(1))
            if n is not None and int(m.group(2)) >= n:
                return f"{self.name} has {n} {m.group(1)} blocks, so no block {m.group(2)}"
        if path.startswith(("siglip_embedder.", "siglip_refiner.")):
            return f"{self.name} has no SigLIP image branch (Z-Image-Omni has one; Base and Turbo do not)"
        return None

    def unresolved_hint(self, lora_key: str) -> str | None:
        """Why a LoRA key names nothing here, where the key says (a text-encoder module)."""
        if lora_key.startswith(TEXT_ENCODER_KEYS):
            return ("a text-encoder (Qwen3) module: prolora reads the Z-Image transformer only, so text-encoder "
                    "LoRA modules are not transferred")
        return None
