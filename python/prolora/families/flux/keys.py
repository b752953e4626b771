"""FLUX.1 / Chroma key maps: the BFL <-> diffusers tables (as data, read both ways), the XLabs
processor names, and the whole-file plan that lays out a BFL single file from diffusers parameters
(used by the synthetic writer and refine's denoiser builder, and checked against diffusers' own
converters in the tests).

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
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import ModelError

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

BFL_DOUBLE = re.compile(r"^double_blocks\.(\d+)\.(.+)$")
BFL_SINGLE = re.compile(r"^single_blocks\.(\d+)\.(.+)$")
D_DOUBLE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
D_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)\.(.+)$")
BFL_APPROX = re.compile(r"^distilled_guidance_layer\.layers\.(\d+)\.(in_layer|out_layer)$")
D_APPROX = re.compile(r"^distilled_guidance_layer\.layers\.(\d+)\.(linear_1|linear_2)$")
D_APPROX_NORM = re.compile(r"^distilled_guidance_layer\.norms\.(\d+)\.weight$")

# strict detection of a BFL file: FLUX.1's per-block modulation (img_mod in the double blocks,
# modulation in the single ones) or Chroma's approximator, under one of BFL_PREFIXES; FLUX.2 (one
# shared double_stream_modulation_img / _txt and single_stream_modulation, no per-block img_mod)
# and later generations (early_stream_modulations) share the double_blocks / single_blocks names
# and are never FLUX.1 (diffusers' single_file_utils tells them apart by the same keys)
_FLUX1_MARK = re.compile(r"^(model\.diffusion_model\.)?(?:double_blocks\.\d+\.img_mod\.lin|"
                         r"single_blocks\.\d+\.modulation\.lin|distilled_guidance_layer\.in_proj)\.weight$")
_NEWER_MARK = re.compile(r"^(?:model\.diffusion_model\.)?(?:double_stream_modulation_(?:img|txt)|"
                         r"single_stream_modulation|early_stream_modulations)\.")


# FLUX.1's fused attention (shared by FLUX.2, which has its own markers) and XLabs' processor names:
# a file with these but without FLUX.1's markers is part of a Flux transformer, or a LoRA
_FLUX_PART = re.compile(r"^(?:model\.diffusion_model\.)?double_blocks\.\d+\.(?:(?:img|txt)_attn\.qkv\.weight$|processor\.)")


def is_flux_keys(keys) -> str | None:
    """The prefix ("model.diffusion_model." or "") under which `keys` (a file's tensor names) hold
    a FLUX.1 or Chroma BFL transformer, by its markers (see above); None for anything else,
    FLUX.2 included."""
    found: set[str] = set()
    for k in keys:
        if _NEWER_MARK.match(k):
            return None
        m = _FLUX1_MARK.match(k)
        if m:
            found.add(m.group(1) or "")
    return next((p for p in BFL_PREFIXES if p in found), None)


def partial_flux_key(keys) -> str | None:
    """A key of FLUX.1's BFL attention or of an XLabs LoRA in a file `is_flux_keys` does not
    claim (no FLUX.1 / Chroma marker, no FLUX.2 one): the file is no whole transformer, and says
    so by this key. None otherwise."""
    keys = list(keys)
    if any(_NEWER_MARK.match(k) for k in keys):
        return None
    return next((k for k in keys if _FLUX_PART.match(k)), None)


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
        m = BFL_DOUBLE.match(path)
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
        m = BFL_SINGLE.match(path)
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
        m = BFL_APPROX.match(path)
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
        m = D_DOUBLE.match(path)
        if m:
            i, rest = m.groups()
            if rest in inv_double:
                out[path] = BflPlace(f"double_blocks.{i}.{inv_double[rest]}", None, rows)
            elif rest in fused_double:
                bfl, j = fused_double[rest]
                out[path] = BflPlace(f"double_blocks.{i}.{bfl}", ((j * rows, (j + 1) * rows),), 3 * rows)
            continue
        m = D_SINGLE.match(path)
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
        m = D_APPROX.match(path)
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
        m = D_DOUBLE.match(name)
        if m and m.group(2) in inv_double:
            add(f"double_blocks.{m.group(1)}.{inv_double[m.group(2)]}", name, 0, shape[0])
            continue
        m = D_SINGLE.match(name)
        if m and m.group(2) in inv_single:
            add(f"single_blocks.{m.group(1)}.{inv_single[m.group(2)]}", name, 0, shape[0])
            continue
        m = D_APPROX_NORM.match(name)
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
