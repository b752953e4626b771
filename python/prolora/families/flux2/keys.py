"""FLUX.2's names: the BFL <-> diffusers tables (data, read both ways), the fused weights and the
slices prolora cuts them into (the canonical ids), and strict detection of BFL single files.

Layout (diffusers 0.42 models/transformers/transformer_flux2.py, Flux2Transformer2DModel)
-----------------------------------------------------------------------------------------
Width h = heads x 128 ([klein] 4B: 3072, [klein] 9B: 4096, [dev]: 6144), SwiGLU MLP width
m = mlp_ratio x h (3h), every linear bias-free:

    BFL (single files, kohya, ComfyUI)    diffusers                                     rows (of the stored weight)
    double_blocks.N.img_attn.qkv          transformer_blocks.N.attn.to_q / to_k / to_v      [0,h) [h,2h) [2h,3h)
    double_blocks.N.txt_attn.qkv          ... attn.add_q_proj / add_k_proj / add_v_proj     idem
    double_blocks.N.img_attn.proj         ... attn.to_out.0;   txt_attn.proj -> attn.to_add_out
    double_blocks.N.img_mlp.0             ... ff.linear_in  [2m, h]  SwiGLU gate rows [0,m), up rows [m,2m)
    double_blocks.N.img_mlp.2             ... ff.linear_out [h, m]   (txt_mlp -> ff_context)
    single_blocks.M.linear1               single_transformer_blocks.M.attn.to_qkv_mlp_proj  [3h + 2m, h]
                                          q [0,h) k [h,2h) v [2h,3h) gate [3h,3h+m) up [3h+m,3h+2m)
    single_blocks.M.linear2               ... attn.to_out   [h, h + m]  (attention out | MLP out columns)
    double_stream_modulation_img.lin      double_stream_modulation_img.linear  [6h, h]  (_txt alike)
    single_stream_modulation.lin          single_stream_modulation.linear      [3h, h]
    img_in, txt_in                        x_embedder, context_embedder
    time_in / guidance_in .in_layer/.out_layer   time_guidance_embed.{timestep,guidance}_embedder.linear_1/_2
    final_layer.linear                    proj_out
    final_layer.adaLN_modulation.1        norm_out.linear, halves swapped: BFL (shift, scale), diffusers (scale, shift)

(diffusers' convert_flux2_transformer_checkpoint_to_diffusers; norm scales `*.norm.query_norm.scale`
-> `norm_q.weight` are no LoRA targets). The modulation is shared: one linear for all double
blocks' image stream, one for their text stream, one for all single blocks (FLUX.1 has one per
block). guidance_in exists in [dev] only ([klein] is guidance-free).

Canonical ids: the slices
-------------------------
``transformer.<diffusers path>`` for every whole linear; a fused weight's logical operators are
canonical modules of their own, each a row range of the fused tensor (as FLUX.1's qkv / linear1,
families/flux/model.py, for why: per-slice subspaces are invariant under the reparametrisations
that leave the model unchanged, fused ones are not):

    transformer.single_transformer_blocks.M.attn.to_qkv_mlp_proj.{q,k,v,mlp_gate,mlp_up}
    transformer.transformer_blocks.N.{ff,ff_context}.linear_in.{gate,up}
    transformer.transformer_blocks.N.attn.to_q / ...   (whole in diffusers, slices of BFL's qkv)

q, k and v are separate operators (each its own RMSNorm and rotary embedding); the SwiGLU gate
and up are two linear maps whose outputs only meet in silu(gate) * up, and scaling the up rows by
c and linear_out's columns by 1/c leaves the model unchanged (as q x2, k x0.5 does under QK norm).
to_out / linear2 stays whole, as FLUX.1's linear2: its two parts are column blocks (attention out,
MLP out) that write the same output rows, and prolora's slices are row ranges (a column split
would need column slices in the engine and the part writer).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import ModelError

MEMBER = "flux2"
COMPONENT = "transformer"
CLASS = "Flux2Transformer2DModel"
PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinKVPipeline", "Flux2KleinInpaintPipeline")
BFL_PREFIXES = ("model.diffusion_model.", "")
Rows = tuple[tuple[int, int], ...]

# BFL module (inside double block N) -> diffusers module (inside transformer_blocks.N), whole
DOUBLE_WHOLE = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
                "img_mlp.2": "ff.linear_out", "txt_mlp.2": "ff_context.linear_out"}
# fused in BFL, separate in diffusers
DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
              "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
# fused in both (SwiGLU gate | up): BFL -> diffusers module, the slices' names after it
DOUBLE_GLU = {"img_mlp.0": "ff.linear_in", "txt_mlp.0": "ff_context.linear_in"}
GLU_SLICES = ("gate", "up")
SINGLE_WHOLE = {"linear2": "attn.to_out"}
SINGLE_FUSED = ("linear1", "attn.to_qkv_mlp_proj")
SINGLE_SLICES = ("q", "k", "v", "mlp_gate", "mlp_up")
GLOBAL_WHOLE = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
}
GLOBAL_SWAPPED = ("final_layer.adaLN_modulation.1", "norm_out.linear")
# norm scales (no LoRA targets), for writing whole files
DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
GUIDANCE = "time_guidance_embed.guidance_embedder."

BFL_DOUBLE = re.compile(r"^double_blocks\.(\d+)\.")
BFL_SINGLE = re.compile(r"^single_blocks\.(\d+)\.")
D_DOUBLE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
D_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)\.(.+)$")

# strict detection of a BFL file: FLUX.2's shared modulation (diffusers' CHECKPOINT_KEY_NAMES
# "flux2"), under one of BFL_PREFIXES; FLUX.3 (early_stream_modulations) is another architecture
MARKERS = ("single_stream_modulation.lin.weight", "double_stream_modulation_img.lin.weight")
_FLUX3_MARK = re.compile(r"^(?:model\.diffusion_model\.)?early_stream_modulations\.")


def bfl_prefix(keys) -> str | None:
    """The prefix under which `keys` (a file's tensor names) hold FLUX.2's BFL markers; None for
    anything else (FLUX.1, FLUX.3 included)."""
    keys = set(keys)
    if any(_FLUX3_MARK.match(k) for k in keys):
        return None
    return next((p for p in BFL_PREFIXES if any(p + m in keys for m in MARKERS)), None)


@dataclass(frozen=True)
class Place:
    """One canonical module (its path without the component): where it lives in BFL naming and
    in diffusers naming, each a module path and the rows of that module's weight (None: all of
    them; several ranges: concatenated in order, the swapped final modulation)."""

    path: str
    bfl: str
    bfl_rows: Rows | None
    dif: str
    dif_rows: Rows | None


@dataclass(frozen=True)
class Structure:
    """What the tables need of a model: width, MLP width, block counts, guidance embedder."""

    hidden: int
    mlp: int
    double: int
    single: int
    guidance: bool


def _cut(sizes: list[int]) -> list[Rows]:
    out, at = [], 0
    for n in sizes:
        out.append(((at, at + n),))
        at += n
    return out


def places(s: Structure) -> list[Place]:
    """Every LoRA-able canonical module of a FLUX.2 transformer of structure `s`, in model order."""
    h, m = s.hidden, s.mlp
    out = [Place(GLOBAL_WHOLE[b], b, None, GLOBAL_WHOLE[b], None) for b in (
        "time_in.in_layer", "time_in.out_layer", *(("guidance_in.in_layer", "guidance_in.out_layer") if s.guidance else ()),
        "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
        "img_in", "txt_in")]
    for i in range(s.double):
        bb, db = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for bfl, names in DOUBLE_QKV.items():
            for name, rows in zip(names, _cut([h, h, h])):
                out.append(Place(f"{db}.{name}", f"{bb}.{bfl}", rows, f"{db}.{name}", None))
        for bfl, dif in DOUBLE_WHOLE.items():
            if bfl.endswith("proj"):
                out.append(Place(f"{db}.{dif}", f"{bb}.{bfl}", None, f"{db}.{dif}", None))
        for bfl, dif in DOUBLE_GLU.items():
            for name, rows in zip(GLU_SLICES, _cut([m, m])):
                out.append(Place(f"{db}.{dif}.{name}", f"{bb}.{bfl}", rows, f"{db}.{dif}", rows))
            out2 = bfl.replace(".0", ".2")
            out.append(Place(f"{db}.{DOUBLE_WHOLE[out2]}", f"{bb}.{out2}", None, f"{db}.{DOUBLE_WHOLE[out2]}", None))
    bfl1, dif1 = SINGLE_FUSED
    for i in range(s.single):
        bb, db = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for name, rows in zip(SINGLE_SLICES, _cut([h, h, h, m, m])):
            out.append(Place(f"{db}.{dif1}.{name}", f"{bb}.{bfl1}", rows, f"{db}.{dif1}", rows))
        out.append(Place(f"{db}.{SINGLE_WHOLE['linear2']}", f"{bb}.linear2", None, f"{db}.{SINGLE_WHOLE['linear2']}", None))
    bfl, dif = GLOBAL_SWAPPED
    out.append(Place(dif, bfl, ((h, 2 * h), (0, h)), dif, None))
    out.append(Place("proj_out", "final_layer.linear", None, "proj_out", None))
    return out


def _blocks(names, rx: re.Pattern) -> int:
    found = {int(m.group(1)) for m in map(rx.match, names) if m}
    if found and found != set(range(len(found))):
        raise ModelError(f"FLUX.2 blocks are not numbered 0..{len(found) - 1}: {sorted(found)}")
    return len(found)


def structure(shapes: dict[str, tuple[int, ...]], bfl: bool, where: object) -> Structure:
    """The structure of a transformer from its 2-D module weights ({module path: shape}) in BFL
    (`bfl`) or diffusers naming; ModelError when the widths do not add up."""
    names = (("img_in", "single_blocks.0.linear1", "single_blocks.0.linear2", "guidance_in.in_layer")
             if bfl else ("x_embedder", "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
                          "single_transformer_blocks.0.attn.to_out", "time_guidance_embed.guidance_embedder.linear_1"))
    embed, fused, out = (shapes.get(n) for n in names[:3])
    if embed is None:
        raise ModelError(f"{where}: FLUX.2 keys but no '{names[0]}' weight: not a whole FLUX.2 transformer "
                         "(a LoRA, or a partial file?)")
    h = embed[0]
    double = _blocks(shapes, BFL_DOUBLE if bfl else re.compile(r"^transformer_blocks\.(\d+)\."))
    single = _blocks(shapes, BFL_SINGLE if bfl else re.compile(r"^single_transformer_blocks\.(\d+)\."))
    m = 3 * h
    if single:
        if fused is None or out is None:
            raise ModelError(f"{where}: single block 0 lacks '{names[1]}' or '{names[2]}'")
        m = out[1] - h
        if fused[0] != 3 * h + 2 * m:
            raise ModelError(f"{where}: '{names[1]}' has {fused[0]} rows, not 3 x {h} (q, k, v) + 2 x {m} "
                             "(SwiGLU gate and up): not a FLUX.2 single block")
    return Structure(h, m, double, single, names[3] in shapes)


def describe(s: Structure) -> str:
    """Which FLUX.2 this is, by its width and guidance embedder: "klein-4b" (3072), "klein-9b"
    (4096), "dev" (guidance embedder); "klein" for another width (synthetic models)."""
    if s.guidance:
        return "dev"
    return {3072: "klein-4b", 4096: "klein-9b"}.get(s.hidden, "klein")
