"""FluxModel: a FLUX.1 or Chroma model as prolora sees it (canonical ids and every LoRA spelling:
PEFT, kohya BFL and `lora_transformer_` names, ComfyUI, XLabs; fused-slice tables; what a model
lacks; its description). Key maps in keys.py, readers in read.py.

Fused weights: subspaces per logical slice
------------------------------------------
q, k, v and the MLP input are different operators that only share a storage layout, so bases are
computed per slice (each slice is a WeightRef row range of the fused tensor), never for the fused
matrix. A LoRA on the fused module is cut into one part per slice (formats.parts.split_module),
each part is transferred with its slice's bases, and the parts are written back in the input's
layout (kohya split_qkv block-diagonal form for kohya/ComfyUI/XLabs keys, separate modules for
diffusers/PEFT). Measured on synthetic slices with trained-like spectra (q, k, v, mlp independent
operators; h = 384 and 768, rank-16 LoRA, energy:0.9, prolora-full; rerun it with
`PYTHONPATH=python:tests python tests/families/test_flux.py 384`, and test_flux.py checks the first point on a
synthetic tiny Flux):

- Function-preserving reparametrisation (q rows x2, k rows x0.5: Flux's QK RMSNorm makes the model
  identical): per-slice bases give phi = 1.000 and reproduce dW exactly (rel. change 5e-15); fused
  bases see another matrix: phi_left falls to 0.74 (qkv) / 0.82 (linear1), below tau = 0.8 for qkv
  (the layer would be dropped for an identical model), dW changes by 51% / 38%, and 35% / 28% of
  a q-only LoRA's energy leaks into k, v and the MLP rows.
- Fine-tune-like targets (source + 10% perturbation, per slice or on the fused matrix): fused
  bases leak 7-9% of a q-only LoRA's energy into other slices (per slice: 0 by construction); the
  MLP rows hold 57% of linear1's energy, so the fused subspace is chosen mostly by the MLP. Fused
  bases stay closer to the copied LoRA there (dW changes by 15-20% vs 20-26% per slice), which
  is no evidence either way: with energy:0.9 the fused k covers ~69% of the input side, a slice's
  ~51%, and a larger k keeps more of dW in place.
- Cost: the Gram products have the same FLOPs either way; what grows is the number of 3072 x 3072
  eigendecompositions: 494 per full FLUX.1 instead of 304 with fused bases (1.6x). On the shared
  2-core CPU (eigh-bound) one qkv weight took 2.8x and one linear1 3.4x the fused time; paid once
  per model pair (basis cache), batched on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...checkpoints.model import BaseModel, FusedHit, Slice, _flat
from ...errors import ModelError
from ..sd.model import SdModel
from .chroma import CHROMA, chroma_lacks
from .keys import APPROX, BFL_DOUBLE, BFL_SINGLE, COMPONENT, GUIDANCE, T5, T5_COMFY, XLABS_DOUBLE, BflPlace, Rows


@dataclass(eq=False, repr=False)
class FluxModel(BaseModel):
    """A Flux base model. Weights are keyed `transformer.<diffusers path>` (see module doc);
    `bfl` holds each one's BFL place, which the kohya / ComfyUI / XLabs spellings use."""

    bfl: dict[str, BflPlace] = field(default_factory=dict, repr=False)
    facts: dict = field(default_factory=dict, repr=False)
    LINEAR_ONLY: ClassVar[bool] = True  # every weight a linear: inspect counts no convs
    # the pipeline component holding T5 (PEFT keys are spelled with it): FLUX.1's text_encoder_2,
    # Chroma's text_encoder (its only encoder); the canonical ids stay `text_encoder_2.` either way
    t5_component: str = field(default=T5, repr=False)
    _fused: dict[str, FusedHit] | None = field(default=None, repr=False)
    _fused_out: dict[tuple[str, str], tuple[str, int, Rows]] | None = field(default=None, repr=False)

    def pipeline_component(self, component: str) -> str:
        return self.t5_component if component == T5 else component

    @property
    def kohya_spelling(self) -> str:
        """kohya's Flux scripts write BFL names (`lora_unet_double_blocks_0_img_attn_qkv`)."""
        return "kohya-ldm"

    @property
    def variant(self) -> str:
        if self.family == CHROMA:
            return CHROMA
        return "dev" if any(m.startswith(f"{COMPONENT}.{GUIDANCE}") for m in self.weights) else "schnell"

    def _two_encoders(self) -> bool:  # kohya's Flux scripts name CLIP-L lora_te1_
        return True

    def _clip_l(self) -> SdModel:
        """The CLIP-L weights (neither transformer nor T5) as an SD model with two encoders, whose
        spellings they share (kohya lora_te1_, ComfyUI text_encoders.clip_l.)."""
        others = {m: r for m, r in self.weights.items() if m.partition(".")[0] not in (COMPONENT, T5)}
        clip = SdModel(self.path, self.name, self.layout, self.family, others, self.files, self.headers,
                       text_encoders=self.text_encoders)
        clip._two_encoders = lambda: True  # type: ignore[method-assign]
        return clip

    # ------------------------------------------------------------------ spellings
    def _xlabs_whole(self, path: str) -> str | None:
        p = self.bfl.get(f"{COMPONENT}.{path}")
        if p is None or not p.whole:
            return None
        m = BFL_DOUBLE.match(p.path)
        if m:
            inv = {v: k for k, v in XLABS_DOUBLE.items()}
            name = inv.get(m.group(2))
            return f"double_blocks.{m.group(1)}.processor.{name}" if name and "qkv" not in name else None
        m = BFL_SINGLE.match(p.path)
        if m and m.group(2) == "linear2":
            return f"single_blocks.{m.group(1)}.processor.proj_lora"
        return None

    def spell(self, module: str, spelling: str) -> str:
        """The LoRA key of a module spelled whole (see `spell_fused` for slices of fused ones):
        peft `transformer.<path>`, kohya-diffusers `lora_transformer_<path>`, kohya-ldm
        `lora_unet_<BFL path>`, comfy `diffusion_model.<BFL path>`, xlabs `double_blocks.N.processor...`."""
        if module not in self.weights:
            raise ModelError(f"{self.path}: no weight '{module}' in this model")
        component, _, path = module.partition(".")
        if component != COMPONENT:
            if spelling == "xlabs":
                raise ModelError(f"{self.path}: '{module}' has no XLabs name (XLabs LoRAs adapt the transformer only)")
            if component == T5:
                return {"peft": f"{self.t5_component}.{path}", "comfy": T5_COMFY + path}.get(
                    spelling, "lora_te3_" + _flat(path))
            return self._clip_l().spell(module, spelling)
        if spelling == "peft":
            return module
        if spelling == "kohya-diffusers":
            return "lora_transformer_" + _flat(path)
        place = self.bfl.get(module)
        if spelling in ("kohya-ldm", "comfy"):
            if place is None or not place.whole:
                raise ModelError(f"{self.path}: '{module}' is a slice of a fused BFL weight; it has no whole "
                                 f"'{spelling}' name")
            return ("lora_unet_" + _flat(place.path)) if spelling == "kohya-ldm" else "diffusion_model." + place.path
        if spelling == "xlabs":
            name = self._xlabs_whole(path)
            if name is None:
                raise ModelError(f"{self.path}: '{module}' has no whole XLabs name")
            return name
        raise ValueError(f"unknown spelling {spelling!r}")

    def _add_aliases(self, add) -> None:
        others = self._clip_l()
        if others.weights:  # CLIP-L: the SD models' table over those weights only
            for alias, (module, spelling) in others._alias_table().items():
                add(alias, module, "kohya-ldm" if spelling.startswith("kohya") else spelling)
        for module in self.weights:
            component, _, path = module.partition(".")
            if component == T5:
                add(f"{self.t5_component}.{path}", module, "peft")
                add("lora_te3_" + _flat(path), module, "kohya-ldm")
                add(T5_COMFY + path, module, "comfy")
            if component != COMPONENT:
                continue
            add(module, module, "peft")
            add("lora_transformer_" + _flat(path), module, "kohya-diffusers")
            place = self.bfl.get(module)
            if place is not None and place.whole:
                add("lora_unet_" + _flat(place.path), module, "kohya-ldm")
                add("diffusion_model." + place.path, module, "comfy")
            xl = self._xlabs_whole(path)
            if xl is not None:
                add(xl, module, "xlabs")
                add("diffusion_model." + xl, module, "xlabs")

    def _fused_tables(self) -> dict[str, FusedHit]:
        """Fused LoRA keys -> FusedHit, and (module, spelling) -> (key, rows, module's rows)."""
        if self._fused is not None:
            return self._fused
        groups: dict[str, list[tuple[str, BflPlace]]] = {}
        for module, place in self.bfl.items():
            if module in self.weights and not place.whole:
                groups.setdefault(place.path, []).append((module, place))
        fused: dict[str, FusedHit] = {}
        out: dict[tuple[str, str], tuple[str, int, Rows]] = {}

        def add(key: str, spelling: str, total: int, slices: list[Slice], preferred: bool) -> None:
            fused[key] = FusedHit(spelling, total, tuple(slices))
            if preferred:
                for s in slices:
                    out.setdefault((s.module, spelling), (key, total, s.rows))

        for bfl, members in groups.items():
            total = members[0][1].total
            slices = [Slice(m, p.rows) for m, p in sorted(members, key=lambda x: x[1].rows[0][0])]
            add("lora_unet_" + _flat(bfl), "kohya-ldm", total, slices, True)
            add("diffusion_model." + bfl, "comfy", total, slices, True)
            m = BFL_DOUBLE.match(bfl)
            xl = None
            if m and m.group(2) in ("img_attn.qkv", "txt_attn.qkv"):
                xl = f"double_blocks.{m.group(1)}.processor.qkv_lora{1 if m.group(2).startswith('img') else 2}"
                xl_slices, xl_total = slices, total
            m = BFL_SINGLE.match(bfl)
            if m and m.group(2) == "linear1":  # XLabs adapts the q, k, v rows of linear1 only
                xl = f"single_blocks.{m.group(1)}.processor.qkv_lora"
                xl_slices = [s for s in slices if not s.module.endswith(".proj_mlp")]
                xl_total = max(b for s in xl_slices for _, b in s.rows)
            if xl is not None:
                add(xl, "xlabs", xl_total, xl_slices, True)
                add("diffusion_model." + xl, "xlabs", xl_total, xl_slices, False)
        self._fused, self._fused_out = fused, out
        return fused

    def resolve_fused(self, lora_key: str) -> FusedHit | None:
        return self._fused_tables().get(lora_key)

    def spell_fused(self, module: str, spelling: str) -> tuple[str, int, Rows] | None:
        self._fused_tables()
        return self._fused_out.get((module, spelling))

    def unspellable(self, module: str, spelling: str) -> str | None:
        component, _, path = module.partition(".")
        if spelling != "xlabs":
            return None
        if component != COMPONENT:
            return "no XLabs name (XLabs LoRAs adapt the transformer only); write kohya, comfy or peft to keep it"
        if self._xlabs_whole(path) is not None or self.spell_fused(module, spelling) is not None:
            return None
        return ("no XLabs name (XLabs LoRAs adapt only attention qkv and output projections); write kohya, "
                "comfy or peft to keep it")

    def missing_hint(self, module: str) -> str | None:
        component = module.partition(".")[0]
        if component == T5 and not any(m.startswith(T5 + ".") for m in self.weights):
            return f"{self.name} has no T5 encoder in it (transformer only); a target that holds T5 keeps these modules"
        if self.family == CHROMA:
            return chroma_lacks(module, self.name)
        if module.startswith(f"{COMPONENT}.{GUIDANCE}"):
            return f"{self.name} has no guidance embedder (guidance_in), like FLUX.1-schnell"
        if module.startswith(f"{COMPONENT}.{APPROX}"):
            return (f"{self.name} has no distilled_guidance_layer (Chroma's modulation approximator; FLUX.1 "
                    "has img_mod, txt_mod and modulation linears instead)")
        return None
