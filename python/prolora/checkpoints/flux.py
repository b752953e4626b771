"""Flux (FLUX.1-dev / -schnell and same-shaped models): BFL single files and diffusers folders.

Canonical ids
-------------
``transformer.<module path in diffusers' FluxTransformer2DModel>``, e.g.
``transformer.transformer_blocks.3.attn.to_q`` or ``transformer.single_transformer_blocks.7.proj_mlp``
(the CLIP-L text encoder of a pipeline folder keeps ``text_encoder.text_model...``). diffusers
names every logical operator separately, so the ids are the per-slice weights:

    BFL (single file, kohya, ComfyUI)      canonical (diffusers)                       rows of the BFL weight
    double_blocks.N.img_attn.qkv           transformer_blocks.N.attn.to_q / to_k / to_v    [0,h) [h,2h) [2h,3h)
    double_blocks.N.txt_attn.qkv           ... attn.add_q_proj / add_k_proj / add_v_proj   idem
    double_blocks.N.img_attn.proj          ... attn.to_out.0;   txt_attn.proj -> attn.to_add_out
    double_blocks.N.img_mlp.0 / .2         ... ff.net.0.proj / ff.net.2 (txt_mlp -> ff_context)
    double_blocks.N.img_mod.lin            ... norm1.linear;    txt_mod.lin -> norm1_context.linear
    single_blocks.M.linear1                single_transformer_blocks.M.attn.to_q / to_k / to_v / proj_mlp
                                                                                   [0,h) [h,2h) [2h,3h) [3h,3h+mlp)
    single_blocks.M.linear2 / modulation.lin   ... proj_out / norm.linear
    img_in, txt_in                         x_embedder, context_embedder
    time_in / vector_in / guidance_in .in_layer/.out_layer
                                           time_text_embed.{timestep,text,guidance}_embedder.linear_1/_2
    final_layer.linear                     proj_out
    final_layer.adaLN_modulation.1         norm_out.linear, halves swapped: BFL (shift, scale), diffusers
                                           (scale, shift)
h is the hidden width (3072), mlp the MLP width (12288); both are read from the file, so tiny
models work the same. guidance_in exists in FLUX.1-dev only (schnell is guidance-free): a dev LoRA
on it has no counterpart in schnell and is dropped and reported.

Chroma
------
Chroma (diffusers ChromaTransformer2DModel, from FLUX.1-schnell) is read by the same code as family
"chroma": the same double and single blocks at the same widths, without the modulation linears
(img_mod / txt_mod -> norm1.linear / norm1_context.linear, single-block modulation -> norm.linear,
final_layer.adaLN_modulation -> norm_out.linear) and without time_in / vector_in / guidance_in
(time_text_embed.*: Chroma's time_text_embed has no weights). What it adds is the modulation
approximator, whose 2-D weights are

    BFL                                            canonical (diffusers)
    distilled_guidance_layer.in_proj / out_proj    distilled_guidance_layer.in_proj / out_proj
    distilled_guidance_layer.layers.N.in_layer     distilled_guidance_layer.layers.N.linear_1
    distilled_guidance_layer.layers.N.out_layer    distilled_guidance_layer.layers.N.linear_2
    (distilled_guidance_layer.norms.N.scale        distilled_guidance_layer.norms.N.weight, no LoRA target)

(diffusers' convert_chroma_transformer_checkpoint_to_diffusers). Its pipeline has a T5 encoder in
text_encoder/ and no CLIP-L. A Flux LoRA's modules on what Chroma lacks get no counterpart and are
dropped and named in the report (`missing_hint`); the output holds no key for them.

Fused weights: subspaces per logical slice
------------------------------------------
q, k, v and the MLP input are different operators that only share a storage layout, so bases are
computed per slice (each slice is a WeightRef row range of the fused tensor), never for the fused
matrix. A LoRA on the fused module is cut into one part per slice (formats.parts.split_module),
each part is transferred with its slice's bases, and the parts are written back in the input's
layout (kohya split_qkv block-diagonal form for kohya/ComfyUI/XLabs keys, separate modules for
diffusers/PEFT). Measured on synthetic slices with trained-like spectra (q, k, v, mlp independent
operators; h = 384 and 768, rank-16 LoRA, energy:0.9, prolora-full; rerun it with
`PYTHONPATH=python python tests/test_flux.py 384`, and test_flux.py checks the first point on a
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

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError
from ..safetensors_io import Header, TensorInfo, read_header
from .encoders import Component, Tensors, clip_from_transformers, t5_from_transformers
from .model import BaseModel, FusedHit, Slice, WeightRef, _flat

COMPONENT = "transformer"
Rows = tuple[tuple[int, int], ...]

# BFL module (inside double block N) -> diffusers module (inside transformer_blocks.N)
DOUBLE_WHOLE = {
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
}
DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE_WHOLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
GLOBAL_WHOLE = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    # Chroma's modulation approximator (ChromaApproximator)
    "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
}
APPROX = "distilled_guidance_layer."
APPROX_LAYER = {"in_layer": "linear_1", "out_layer": "linear_2"}
GLOBAL_SWAPPED = {"final_layer.adaLN_modulation.1": "norm_out.linear"}
# parameters that are no LoRA targets (norm scales), for writing whole files
DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}

# XLabs processor LoRAs (x-flux): module -> BFL module and which of its rows
XLABS_DOUBLE = {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv",
                "proj_lora1": "img_attn.proj", "proj_lora2": "txt_attn.proj"}
XLABS_SINGLE = {"qkv_lora": "linear1", "proj_lora": "linear2"}  # qkv_lora: the q, k, v rows only

GUIDANCE = "time_text_embed.guidance_embedder."
# the T5 encoder: text_encoder_2/ of a diffusers pipeline, `text_encoders.t5xxl.transformer.` in
# ComfyUI all-in-one files; kohya's Flux scripts name its LoRA modules lora_te3_ (lora_te1_: CLIP-L)
T5 = "text_encoder_2"
T5_COMFY = "text_encoders.t5xxl.transformer."
BFL_PREFIXES = ("model.diffusion_model.", "")

_DOUBLE = re.compile(r"^double_blocks\.(\d+)\.(.+)$")
_SINGLE = re.compile(r"^single_blocks\.(\d+)\.(.+)$")
_D_DOUBLE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_D_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)\.(.+)$")
_APPROX = re.compile(r"^distilled_guidance_layer\.layers\.(\d+)\.(in_layer|out_layer)$")
_D_APPROX = re.compile(r"^distilled_guidance_layer\.layers\.(\d+)\.(linear_1|linear_2)$")
_D_APPROX_NORM = re.compile(r"^distilled_guidance_layer\.norms\.(\d+)\.weight$")


@dataclass(frozen=True)
class BflPlace:
    """Where a canonical Flux module lives in BFL naming: the BFL module, the rows of its weight
    (None: all of them, in order) and that weight's row count."""

    path: str
    rows: Rows | None
    total: int

    @property
    def whole(self) -> bool:
        return self.rows is None


def _split_rows(sizes: list[int]) -> list[Rows]:
    out, at = [], 0
    for n in sizes:
        out.append(((at, at + n),))
        at += n
    return out


def bfl_to_diffusers(shapes: dict[str, tuple[int, ...]], where: str = "") -> tuple[dict[str, BflPlace], list[str]]:
    """{canonical path (no component) -> BflPlace} for the 2-D BFL module weights in `shapes`
    ({BFL module path: weight shape}), and the BFL modules that map nowhere.

    Row splits come from the shapes: qkv in three equal parts; linear1 as q, k, v of the hidden
    width (rows of the block's linear2) and the MLP rows after them; the final modulation in two
    swapped halves."""
    hidden = None
    for path, shape in shapes.items():
        if path.endswith(".linear2") or path in ("img_in", "double_blocks.0.img_attn.proj"):
            hidden = shape[0]
            break
    out: dict[str, BflPlace] = {}
    unmapped: list[str] = []
    for path, shape in shapes.items():
        rows = shape[0]
        m = _DOUBLE.match(path)
        if m:
            i, rest = m.groups()
            if rest in DOUBLE_WHOLE:
                out[f"transformer_blocks.{i}.{DOUBLE_WHOLE[rest]}"] = BflPlace(path, None, rows)
            elif rest in DOUBLE_FUSED:
                if rows % 3:
                    raise ModelError(f"{where}: '{path}' has {rows} rows, not a multiple of 3 (q, k, v)")
                for name, r in zip(DOUBLE_FUSED[rest], _split_rows([rows // 3] * 3)):
                    out[f"transformer_blocks.{i}.{name}"] = BflPlace(path, r, rows)
            else:
                unmapped.append(path)
            continue
        m = _SINGLE.match(path)
        if m:
            i, rest = m.groups()
            if rest in SINGLE_WHOLE:
                out[f"single_transformer_blocks.{i}.{SINGLE_WHOLE[rest]}"] = BflPlace(path, None, rows)
            elif rest in SINGLE_FUSED:
                h = shapes.get(f"single_blocks.{i}.linear2", (hidden,))[0] or hidden
                if h is None or rows <= 3 * h:
                    raise ModelError(f"{where}: cannot split '{path}' ({rows} rows) into q, k, v and MLP rows: "
                                     "hidden width unknown (no linear2 / img_in)")
                for name, r in zip(SINGLE_FUSED[rest], _split_rows([h, h, h, rows - 3 * h])):
                    out[f"single_transformer_blocks.{i}.{name}"] = BflPlace(path, r, rows)
            else:
                unmapped.append(path)
            continue
        m = _APPROX.match(path)
        if m:
            out[f"distilled_guidance_layer.layers.{m.group(1)}.{APPROX_LAYER[m.group(2)]}"] = BflPlace(path, None, rows)
        elif path in GLOBAL_WHOLE:
            out[GLOBAL_WHOLE[path]] = BflPlace(path, None, rows)
        elif path in GLOBAL_SWAPPED:
            if rows % 2:
                raise ModelError(f"{where}: '{path}' has {rows} rows, not two halves (shift, scale)")
            h = rows // 2
            out[GLOBAL_SWAPPED[path]] = BflPlace(path, ((h, rows), (0, h)), rows)
        else:
            unmapped.append(path)
    return out, unmapped


def diffusers_to_bfl(shapes: dict[str, tuple[int, ...]]) -> dict[str, BflPlace]:
    """{canonical path -> BflPlace} from diffusers module weights ({path: shape}); the inverse of
    `bfl_to_diffusers` (checked against it and against diffusers' converter in the tests)."""
    inv_double = {v: k for k, v in DOUBLE_WHOLE.items()}
    inv_single = {v: k for k, v in SINGLE_WHOLE.items()}
    inv_global = {v: k for k, v in GLOBAL_WHOLE.items()}
    inv_swapped = {v: k for k, v in GLOBAL_SWAPPED.items()}
    fused_double = {name: (bfl, j) for bfl, names in DOUBLE_FUSED.items() for j, name in enumerate(names)}
    fused_single = {name: j for j, name in enumerate(SINGLE_FUSED["linear1"])}
    out: dict[str, BflPlace] = {}
    for path, shape in shapes.items():
        rows = shape[0]
        m = _D_DOUBLE.match(path)
        if m:
            i, rest = m.groups()
            if rest in inv_double:
                out[path] = BflPlace(f"double_blocks.{i}.{inv_double[rest]}", None, rows)
            elif rest in fused_double:
                bfl, j = fused_double[rest]
                out[path] = BflPlace(f"double_blocks.{i}.{bfl}", ((j * rows, (j + 1) * rows),), 3 * rows)
            continue
        m = _D_SINGLE.match(path)
        if m:
            i, rest = m.groups()
            if rest in inv_single:
                out[path] = BflPlace(f"single_blocks.{i}.{inv_single[rest]}", None, rows)
            elif rest in fused_single:
                sizes = [shapes.get(f"single_transformer_blocks.{i}.{n}", (0,))[0] for n in SINGLE_FUSED["linear1"]]
                j = fused_single[rest]
                start = sum(sizes[:j])
                out[path] = BflPlace(f"single_blocks.{i}.linear1", ((start, start + rows),), sum(sizes))
            continue
        m = _D_APPROX.match(path)
        if m:
            inv = {v: k for k, v in APPROX_LAYER.items()}
            out[path] = BflPlace(f"distilled_guidance_layer.layers.{m.group(1)}.{inv[m.group(2)]}", None, rows)
        elif path in inv_global:
            out[path] = BflPlace(inv_global[path], None, rows)
        elif path in inv_swapped:
            h = rows // 2
            out[path] = BflPlace(inv_swapped[path], ((h, rows), (0, h)), rows)
    return out


# ----------------------------------------------------------------------------- whole files


@dataclass(frozen=True)
class BflEntry:
    """One tensor of a BFL single file made of diffusers parameters: `sources` concatenated along
    dim 0 (q, k, v[, mlp]); `swap`: the two halves of the (single) source exchanged."""

    key: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    swap: bool = False


def bfl_file_plan(params: list[tuple[str, tuple[int, ...]]], prefix: str = "") -> list[BflEntry]:
    """How to lay out a BFL single file from diffusers FluxTransformer2DModel parameters
    [(name, shape)] (weights, biases, norm scales), in the input order of each entry's first part."""
    shapes = dict(params)
    modules = {n[: -len(".weight")]: s for n, s in params if n.endswith(".weight") and len(s) == 2}
    places = diffusers_to_bfl(modules)
    groups: dict[str, dict] = {}
    order: list[str] = []
    inv_double = {v: k for k, v in DOUBLE_NORMS.items()}
    inv_single = {v: k for k, v in SINGLE_NORMS.items()}

    def add(key: str, name: str, start: int, total: int, swap: bool = False) -> None:
        g = groups.get(key)
        if g is None:
            g = groups[key] = {"parts": [], "total": total, "swap": swap, "tail": shapes[name][1:]}
            order.append(key)
        g["parts"].append((start, name))

    for name, shape in params:
        base, _, leaf = name.rpartition(".")
        if base in places and leaf in ("weight", "bias"):
            p = places[base]
            start = 0 if p.rows is None or len(p.rows) > 1 else p.rows[0][0]
            add(f"{p.path}.{leaf}", name, start, p.total, swap=p.rows is not None and len(p.rows) > 1)
            continue
        m = _D_DOUBLE.match(name)
        if m and m.group(2) in inv_double:
            add(f"double_blocks.{m.group(1)}.{inv_double[m.group(2)]}", name, 0, shape[0])
            continue
        m = _D_SINGLE.match(name)
        if m and m.group(2) in inv_single:
            add(f"single_blocks.{m.group(1)}.{inv_single[m.group(2)]}", name, 0, shape[0])
            continue
        m = _D_APPROX_NORM.match(name)
        if m:  # Chroma
            add(f"distilled_guidance_layer.norms.{m.group(1)}.scale", name, 0, shape[0])
            continue
        raise ModelError(f"Flux parameter '{name}' has no BFL name")
    out = []
    for key in order:
        g = groups[key]
        parts = sorted(g["parts"])
        out.append(BflEntry(prefix + key, (g["total"], *g["tail"]), tuple(n for _, n in parts), g["swap"]))
        if sum(shapes[n][0] for _, n in parts) != g["total"]:
            raise ModelError(f"Flux '{key}': parts {[n for _, n in parts]} do not fill its {g['total']} rows")
    return out


# ----------------------------------------------------------------------------- the model


@dataclass(eq=False, repr=False)
class FluxModel(BaseModel):
    """A Flux base model. Weights are keyed `transformer.<diffusers path>` (see module doc);
    `bfl` holds each one's BFL place, which the kohya / ComfyUI / XLabs spellings use."""

    bfl: dict[str, BflPlace] = field(default_factory=dict, repr=False)
    facts: dict = field(default_factory=dict, repr=False)
    # the pipeline component holding T5 (PEFT keys are spelled with it): FLUX.1's text_encoder_2,
    # Chroma's text_encoder (its only encoder); the canonical ids stay `text_encoder_2.` either way
    t5_component: str = field(default=T5, repr=False)
    _fused: dict[str, FusedHit] | None = field(default=None, repr=False)
    _fused_out: dict[tuple[str, str], tuple[str, int, Rows]] | None = field(default=None, repr=False)

    @property
    def kohya_spelling(self) -> str:
        """kohya's Flux scripts write BFL names (`lora_unet_double_blocks_0_img_attn_qkv`)."""
        return "kohya-ldm"

    @property
    def variant(self) -> str:
        if self.family == "chroma":
            return "chroma"
        return "dev" if any(m.startswith(f"{COMPONENT}.{GUIDANCE}") for m in self.weights) else "schnell"

    def _two_encoders(self) -> bool:  # kohya's Flux scripts name CLIP-L lora_te1_
        return True

    # ------------------------------------------------------------------ spellings
    def _xlabs_whole(self, path: str) -> str | None:
        p = self.bfl.get(f"{COMPONENT}.{path}")
        if p is None or not p.whole:
            return None
        m = _DOUBLE.match(p.path)
        if m:
            inv = {v: k for k, v in XLABS_DOUBLE.items()}
            name = inv.get(m.group(2))
            return f"double_blocks.{m.group(1)}.processor.{name}" if name and "qkv" not in name else None
        m = _SINGLE.match(p.path)
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
            return super().spell(module, spelling)
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
        others = {m: r for m, r in self.weights.items() if m.partition(".")[0] not in (COMPONENT, T5)}
        if others:  # text encoders: the UNet models' table over those weights only
            base = BaseModel(self.path, self.name, self.layout, self.family, others, self.files, self.headers, {},
                             text_encoders=self.text_encoders)
            base._two_encoders = lambda: True  # type: ignore[method-assign]
            for alias, (module, spelling) in base._alias_table().items():
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
            m = _DOUBLE.match(bfl)
            xl = None
            if m and m.group(2) in ("img_attn.qkv", "txt_attn.qkv"):
                xl = f"double_blocks.{m.group(1)}.processor.qkv_lora{1 if m.group(2).startswith('img') else 2}"
                xl_slices, xl_total = slices, total
            m = _SINGLE.match(bfl)
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
        if self.family == "chroma":
            return chroma_lacks(module, self.name)
        if module.startswith(f"{COMPONENT}.{GUIDANCE}"):
            return f"{self.name} has no guidance embedder (guidance_in), like FLUX.1-schnell"
        if module.startswith(f"{COMPONENT}.{APPROX}"):
            return (f"{self.name} has no distilled_guidance_layer (Chroma's modulation approximator; FLUX.1 "
                    "has img_mod, txt_mod and modulation linears instead)")
        return None

    # ------------------------------------------------------------------ description
    def describe(self) -> dict:
        comps: dict[str, dict] = {}
        for ref in self.weights.values():
            c = comps.setdefault(ref.module.partition(".")[0], {"weights": 0, "linear": 0, "parameters": 0})
            c["weights"] += 1
            c["linear"] += 1
            c["parameters"] += ref.numel
        for comp, facts in self.text_encoders.items():
            comps.setdefault(comp, {}).update(facts)
        from collections import Counter
        return {
            "name": self.name, "path": str(self.path), "family": self.family, "variant": self.variant,
            "layout": self.layout,
            "files": [{"role": role, "path": str(p), "bytes": p.stat().st_size}
                      for role, p in sorted(self.files.items())],
            "components": comps, "dtypes": dict(Counter(r.dtype for r in self.weights.values())),
            **self.facts,
        }


# ----------------------------------------------------------------------------- readers


def _structure_facts(modules: dict[str, tuple[int, ...]], unmapped: list[str]) -> dict:
    double = {int(m.group(1)) for m in map(_D_DOUBLE.match, modules) if m}
    single = {int(m.group(1)) for m in map(_D_SINGLE.match, modules) if m}
    q = modules.get("single_transformer_blocks.0.attn.to_q") or modules.get("transformer_blocks.0.attn.to_q")
    mlp = modules.get("single_transformer_blocks.0.proj_mlp") or modules.get("transformer_blocks.0.ff.net.0.proj")
    facts = {"double_blocks": len(double), "single_blocks": len(single), "hidden": q[0] if q else None,
             "mlp_hidden": mlp[0] if mlp else None,
             "guidance_embedder": any(m.startswith(GUIDANCE) for m in modules),
             "approximator_layers": len({int(m.group(1)) for m in map(_D_APPROX.match, modules) if m})}
    if unmapped:
        facts["unmapped"] = sorted(unmapped)
    return facts


def _refs_from_bfl(tensors: dict[str, tuple[Path, TensorInfo]], prefix: str, where: str):
    shapes = {}
    for key, (_, info) in tensors.items():
        if key.startswith(prefix) and key.endswith(".weight") and len(info.shape) == 2:
            shapes[key[len(prefix): -len(".weight")]] = tuple(info.shape)
    places, unmapped = bfl_to_diffusers(shapes, where)
    weights: dict[str, WeightRef] = {}
    bfl: dict[str, BflPlace] = {}
    for path, place in places.items():
        module = f"{COMPONENT}.{path}"
        file, info = tensors[prefix + place.path + ".weight"]
        inner = tuple(info.shape[1:])
        if place.rows is None:
            ref = WeightRef(module, file, info.name, tuple(info.shape), info.dtype)
        elif len(place.rows) == 1:
            (a, b), = place.rows
            ref = WeightRef(module, file, info.name, (b - a, *inner), info.dtype, rows=(a, b))
        else:
            n = sum(b - a for a, b in place.rows)
            ref = WeightRef(module, file, info.name, (n, *inner), info.dtype, pieces=place.rows)
        weights[module] = ref
        bfl[module] = place
    facts = _structure_facts({m.partition(".")[2]: r.shape for m, r in weights.items()}, unmapped)
    return weights, bfl, facts


def _order(weights: dict[str, WeightRef]) -> dict[str, WeightRef]:
    """Model order: embedders, double blocks, single blocks (by index), final layer."""
    def rank(m: str):
        path = m.partition(".")[2]
        for i, rx in enumerate((_D_DOUBLE, _D_SINGLE)):
            hit = rx.match(path)
            if hit:
                return (1 + i, int(hit.group(1)), path)
        return (3 if path in ("proj_out", "norm_out.linear") else 0, 0, path)
    return dict(sorted(weights.items(), key=lambda kv: (not kv[0].startswith(COMPONENT + "."), rank(kv[0]))))


def _family(weights: dict[str, WeightRef]) -> str:
    """"chroma" where the transformer has Chroma's modulation approximator, else "flux"."""
    return "chroma" if any(m.startswith(f"{COMPONENT}.{APPROX}") for m in weights) else "flux"


# what Chroma lacks of FLUX.1, by canonical prefix (inside the transformer), and why
_CHROMA_LACKS = (
    (re.compile(r"^transformer_blocks\.\d+\.norm1\.linear$"), "img_mod",
     "Chroma pruned the double blocks' modulation; its distilled_guidance_layer computes it"),
    (re.compile(r"^transformer_blocks\.\d+\.norm1_context\.linear$"), "txt_mod",
     "Chroma pruned the double blocks' modulation; its distilled_guidance_layer computes it"),
    (re.compile(r"^single_transformer_blocks\.\d+\.norm\.linear$"), "single-block modulation",
     "Chroma pruned it; its distilled_guidance_layer computes it"),
    (re.compile(r"^norm_out\.linear$"), "final_layer.adaLN_modulation",
     "Chroma pruned it; its distilled_guidance_layer computes it"),
    (re.compile(r"^time_text_embed\.timestep_embedder\."), "time_in",
     "Chroma feeds the timestep to its distilled_guidance_layer"),
    (re.compile(r"^time_text_embed\.text_embedder\."), "vector_in", "Chroma has no pooled CLIP-L input"),
    (re.compile(r"^time_text_embed\.guidance_embedder\."), "guidance_in", "Chroma has no guidance embedder"),
)


def chroma_lacks(module: str, name: str = "Chroma") -> str | None:
    """Why a Chroma model has no `module` (a canonical FLUX.1 id), or None if Chroma should have it."""
    component, _, path = module.partition(".")
    if component == "text_encoder":
        return f"{name} has no CLIP-L text encoder (Chroma conditions on T5 only)"
    if component != COMPONENT:
        return None
    for rx, what, why in _CHROMA_LACKS:
        if rx.match(path):
            return f"{name} has no {what} ({why})"
    return None


def is_flux_keys(keys) -> str | None:
    """The prefix under which `keys` hold a BFL Flux transformer, else None."""
    keys = list(keys)
    for prefix in BFL_PREFIXES:
        if any(k.startswith(prefix + "double_blocks.") for k in keys) or \
                any(k.startswith(prefix + "single_blocks.") and ".linear1." in k for k in keys):
            return prefix
    return None


def open_flux_single_file(path: Path, header: Header | None = None) -> FluxModel:
    """A BFL single file (bare keys, or ComfyUI's `model.diffusion_model.`); a CLIP-L stored as
    `text_encoders.clip_l.transformer.` and a T5 as `text_encoders.t5xxl.transformer.` are read too."""
    header = header or read_header(path)
    prefix = is_flux_keys(header.tensors)
    if prefix is None:
        raise ModelError(f"{path}: no Flux (BFL) transformer keys (double_blocks.* / single_blocks.*)")
    if prefix + "img_in.weight" not in header.tensors:
        raise ModelError(f"{path}: Flux (BFL) keys but no '{prefix}img_in.weight': not a whole Flux transformer "
                         "(a LoRA, or a partial file?)")
    tensors = {k: (path, info) for k, info in header.tensors.items()}
    weights, bfl, facts = _refs_from_bfl(tensors, prefix, str(path))
    encoders = {}
    clip_prefix = "text_encoders.clip_l.transformer."
    if any(k.startswith(clip_prefix) for k in tensors):
        comp = clip_from_transformers(tensors, "text_encoder", clip_prefix)
        weights.update(comp.weights)
        encoders["text_encoder"] = comp.facts
    if any(k.startswith(T5_COMFY) for k in tensors):
        comp = t5_from_transformers(tensors, T5, T5_COMFY)
        weights.update(comp.weights)
        encoders[T5] = comp.facts
    if not weights:
        raise ModelError(f"{path}: Flux keys but no transformer weights")
    return FluxModel(path=path, name=path.stem, layout="single-file", family=_family(weights), weights=_order(weights),
                     files={"single-file": path}, headers={path: header}, text_encoders=encoders,
                     bfl=bfl, facts=facts)


def is_flux_folder(path: Path) -> bool:
    """A diffusers Flux pipeline folder (transformer/ with a FluxTransformer2DModel) or a bare
    transformer folder."""
    for cfg in (path / "transformer" / "config.json", path / "config.json"):
        try:
            name = str(json.loads(cfg.read_text()).get("_class_name", ""))
            if "Flux" in name or name == "ChromaTransformer2DModel":
                return True
        except (OSError, ValueError):
            continue
    return False


def transformer_from_diffusers(tensors: Tensors, where: str) -> tuple[dict[str, WeightRef], dict[str, BflPlace], dict]:
    """A transformer stored under diffusers FluxTransformer2DModel / ChromaTransformer2DModel names
    (a transformer/ folder, or a module's state dict): its 2-D weights, their BFL places and the
    structure facts."""
    weights: dict[str, WeightRef] = {}
    for key, (file, info) in tensors.items():
        if key.endswith(".weight") and len(info.shape) == 2:
            module = f"{COMPONENT}.{key[: -len('.weight')]}"
            weights[module] = WeightRef(module, file, key, tuple(info.shape), info.dtype)
    if f"{COMPONENT}.x_embedder" not in weights:
        raise ModelError(f"{where}: no 'x_embedder.weight': not a whole Flux transformer")
    shapes = {m.partition(".")[2]: r.shape for m, r in weights.items()}
    places = diffusers_to_bfl(shapes)
    bfl = {f"{COMPONENT}.{p}": place for p, place in places.items()}
    return weights, bfl, _structure_facts(shapes, [m for m in shapes if m not in places])


def open_flux_folder(path: Path) -> FluxModel:
    """A diffusers folder: a pipeline with transformer/ (sharded or not) and optionally CLIP-L in
    text_encoder/ and T5 in text_encoder_2/, or a bare transformer folder."""
    from .folders import read_component

    files: dict[str, Path] = {}
    headers: dict[Path, Header] = {}
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    weights, bfl, facts = transformer_from_diffusers(read_component(folder, path, files, headers), str(folder))
    encoders = {}
    te = path / "text_encoder"
    t5_component = T5
    if folder != path and te.is_dir() and _is_t5(te):  # Chroma: T5 is its only encoder
        t5_component = "text_encoder"
    elif folder != path and te.is_dir():
        comp: Component = clip_from_transformers(read_component(te, path, files, headers), "text_encoder")
        weights.update(comp.weights)
        encoders["text_encoder"] = comp.facts
    t5 = path / t5_component
    if folder != path and t5.is_dir():
        comp = t5_from_transformers(read_component(t5, path, files, headers), T5)
        weights.update(comp.weights)
        encoders[T5] = comp.facts
    return FluxModel(path=path, name=path.name, layout="diffusers", family=_family(weights), weights=_order(weights),
                     files=files, headers=headers, text_encoders=encoders, bfl=bfl, facts=facts,
                     t5_component=t5_component)


def _is_t5(folder: Path) -> bool:
    """A transformers T5 encoder folder (config.json model_type "t5" / T5EncoderModel)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return cfg.get("model_type") in ("t5", "umt5") or any("T5" in a for a in cfg.get("architectures") or [])
