"""Wan text-to-video transformers (diffusers WanTransformer3DModel): Wan 2.1, the two experts of
Wan 2.2 A14B, and Wan 2.2 TI2V-5B, as diffusers folders and as single files.

Canonical ids
-------------
``transformer.<module path in diffusers' WanTransformer3DModel>``, e.g.
``transformer.blocks.3.attn1.to_q``. The original Wan code (and ComfyUI, musubi-tuner, most
trainers) names the same linears differently; the map is diffusers' own
(loaders/single_file_utils.convert_wan_transformer_to_diffusers and
lora_conversion_utils._convert_non_diffusers_wan_lora_to_diffusers):

    original (Wan, ComfyUI, musubi)        canonical (diffusers)
    blocks.N.self_attn.q / k / v / o       blocks.N.attn1.to_q / to_k / to_v / to_out.0
    blocks.N.cross_attn.q / k / v / o      blocks.N.attn2.to_q / to_k / to_v / to_out.0
    blocks.N.cross_attn.k_img / v_img      blocks.N.attn2.add_k_proj / add_v_proj    (2.1 I2V only)
    blocks.N.ffn.0 / ffn.2                 blocks.N.ffn.net.0.proj / ffn.net.2
    text_embedding.0 / .2                  condition_embedder.text_embedder.linear_1 / linear_2
    time_embedding.0 / .2                  condition_embedder.time_embedder.linear_1 / linear_2
    time_projection.1                      condition_embedder.time_proj
    head.head                              proj_out
    img_emb.proj.1 / .3                    condition_embedder.image_embedder.ff.net.0.proj / ff.net.2

Parameters that are no LoRA targets keep their own map for whole files: the q/k norms
(`self_attn.norm_q` -> `attn1.norm_q`, `cross_attn.norm_k_img` -> `attn2.norm_added_k`), the
cross-attention norm (original `norm3` is diffusers' `norm2`), the modulations (`blocks.N.modulation`
-> `blocks.N.scale_shift_table`, `head.modulation` -> `scale_shift_table`) and `patch_embedding`
(a Conv3d, never a LoRA target here).

LoRA spellings: peft `transformer.blocks.0.attn1.to_q` (diffusers, ai-toolkit), kohya-ldm
`lora_unet_blocks_0_self_attn_q` (musubi-tuner and kohya-style trainers), comfy
`diffusion_model.blocks.0.self_attn.q` (ComfyUI, DiffSynth; `lora_A/lora_B` accepted too).

Families and the experts
------------------------
"wan": the 16-channel latent models (VAE 2.1): Wan 2.1 T2V/I2V 14B and 1.3B, and each expert of
Wan 2.2 T2V/I2V A14B, which has the 2.1 14B layout (40 blocks, width 5120). "wan-ti2v": Wan 2.2
TI2V-5B, whose VAE 2.2 latent has 48 channels (patch_embedding input and proj_out rows tell it
apart at any size; at full size it is 30 blocks of width 3072). A transfer between Wan models of
other widths is refused with the reason unless `--widths lstsq` is asked for.

A Wan 2.2 A14B diffusers folder holds two experts: `transformer/` is the high-noise expert (WanPipeline
runs it for timesteps >= boundary_ratio * num_train_timesteps) and `transformer_2/` the low-noise
one. `expert_targets` names them; a transfer to such a folder writes one LoRA per expert
(api.transfer_experts). ComfyUI distributes them as two single files
(`wan2.2_t2v_high_noise_14B_fp16.safetensors`, `..._low_noise_...`), each an ordinary Wan file.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import ModelError
from ...lora import LoraModule
from ...safetensors_io import Header, TensorInfo, read_header
from ...checkpoints.model import BaseModel, WeightRef, _flat

COMPONENT = "transformer"
FAMILIES = ("wan", "wan-ti2v")
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
TI2V_LATENT = 48  # channels of the Wan 2.2 VAE's latent (TI2V-5B); Wan 2.1's VAE has 16
# expert label -> component folder of a Wan 2.2 A14B pipeline (WanPipeline: transformer runs the
# high-noise steps, transformer_2 the low-noise ones)
EXPERTS = {"high_noise": "transformer", "low_noise": "transformer_2"}

# inside block N: original module -> diffusers module (LoRA targets)
BLOCK_LINEARS = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
GLOBAL_LINEARS = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
}
# other parameters (original -> diffusers, full parameter names), for whole files
BLOCK_OTHER = {
    "self_attn.norm_q.weight": "attn1.norm_q.weight", "self_attn.norm_k.weight": "attn1.norm_k.weight",
    "cross_attn.norm_q.weight": "attn2.norm_q.weight", "cross_attn.norm_k.weight": "attn2.norm_k.weight",
    "cross_attn.norm_k_img.weight": "attn2.norm_added_k.weight",
    "norm3.weight": "norm2.weight", "norm3.bias": "norm2.bias", "modulation": "scale_shift_table",
}
GLOBAL_OTHER = {
    "patch_embedding.weight": "patch_embedding.weight", "patch_embedding.bias": "patch_embedding.bias",
    "head.modulation": "scale_shift_table",
    "img_emb.proj.0.weight": "condition_embedder.image_embedder.norm1.weight",
    "img_emb.proj.0.bias": "condition_embedder.image_embedder.norm1.bias",
    "img_emb.proj.4.weight": "condition_embedder.image_embedder.norm2.weight",
    "img_emb.proj.4.bias": "condition_embedder.image_embedder.norm2.bias",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _translate(name: str, block: dict[str, str], other_block: dict[str, str], glob: dict[str, str],
               other_glob: dict[str, str]) -> str | None:
    """`name` through the tables: whole parameter names first (`other_*`), then module names with
    an optional `.weight` / `.bias` leaf (`block` inside blocks.N, `glob` outside)."""
    m = _BLOCK.match(name)
    head, rest = (f"blocks.{m.group(1)}.", m.group(2)) if m else ("", name)
    whole, linears = (other_block, block) if m else (other_glob, glob)
    if rest in whole:
        return head + whole[rest]
    if rest in linears:
        return head + linears[rest]
    stem, _, leaf = rest.rpartition(".")
    if leaf in ("weight", "bias") and stem in linears:
        return f"{head}{linears[stem]}.{leaf}"
    return None


def original_to_diffusers(name: str) -> str | None:
    """The diffusers name of an original Wan parameter or module name (`blocks.0.self_attn.q.weight`,
    `blocks.0.self_attn.q`), or None if it has none."""
    return _translate(name, BLOCK_LINEARS, BLOCK_OTHER, GLOBAL_LINEARS, GLOBAL_OTHER)


def diffusers_to_original(name: str) -> str | None:
    """The inverse of `original_to_diffusers`."""
    return _translate(name, *_INVERSE)


_INVERSE = tuple({v: k for k, v in t.items()} for t in (BLOCK_LINEARS, BLOCK_OTHER, GLOBAL_LINEARS, GLOBAL_OTHER))


# ----------------------------------------------------------------------------- the model


@dataclass(eq=False, repr=False)
class WanModel(BaseModel):
    """A Wan transformer (or both experts of a Wan 2.2 A14B folder). Weights are keyed
    `transformer.<diffusers path>` (a two-expert folder: the low-noise expert's `transformer_2.<...>`);
    `original` holds each one's original Wan name, which the kohya and ComfyUI spellings use."""

    original: dict[str, str] = field(default_factory=dict, repr=False)
    facts: dict = field(default_factory=dict, repr=False)

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
        m = _BLOCK.match(path)
        if m and self.facts.get("blocks") is not None and int(m.group(1)) >= self.facts["blocks"]:
            return f"{self.name} has {self.facts['blocks']} blocks (blocks.0 to blocks.{self.facts['blocks'] - 1})"
        return None

    @property
    def variant(self) -> str:
        """T2V / I2V / TI2V, with the size where the width is a published one (e.g. "T2V-14B")."""
        return str(self.facts.get("variant", "unknown"))

    def describe(self) -> dict:
        """BaseModel's facts with the variant after the family and the reader's structure facts
        last; every weight is a linear, so components count no convs."""
        facts = super().describe()
        for comp in facts["components"].values():
            comp.pop("conv", None)
        head = {k: facts.pop(k) for k in ("name", "path", "family")}
        return {**head, "variant": self.variant, **facts, **self.facts}


# ----------------------------------------------------------------------------- structure


def _structure(shapes: dict[str, tuple[int, ...]], patch: tuple[int, ...] | None) -> dict:
    """Facts from {diffusers parameter name: shape} of one transformer: blocks, widths, channels,
    which Wan model it looks like."""
    blocks = {int(m.group(1)) for m in map(_BLOCK.match, shapes) if m}
    q = shapes.get("blocks.0.attn1.to_q.weight")
    ffn = shapes.get("blocks.0.ffn.net.0.proj.weight")
    text = shapes.get("condition_embedder.text_embedder.linear_1.weight")
    out = shapes.get("proj_out.weight")
    hidden = q[0] if q else None
    in_ch = patch[1] if patch else None
    cells = 1
    for d in (patch or (0, 0, 1, 2, 2))[2:]:
        cells *= d
    out_ch = out[0] // cells if out and cells else None
    i2v = any(".attn2.add_k_proj." in k for k in shapes)
    kind = ("TI2V" if out_ch == TI2V_LATENT else "I2V" if (in_ch is not None and out_ch is not None and in_ch > out_ch) or i2v
            else "T2V")
    size = {5120: "14B", 1536: "1.3B", 3072: "5B"}.get(hidden or 0)
    facts = {"blocks": len(blocks), "hidden": hidden, "ffn": ffn[0] if ffn else None,
             "text_dim": text[1] if text else None, "in_channels": in_ch, "out_channels": out_ch,
             "image_cross_attention": i2v, "variant": f"{kind}-{size}" if size else kind}
    return facts


def _family(facts: dict) -> str:
    return "wan-ti2v" if facts.get("out_channels") == TI2V_LATENT else "wan"


def _weights(tensors: dict[str, tuple[Path, TensorInfo]], names: dict[str, str],
             component: str = COMPONENT) -> tuple[dict[str, WeightRef], dict[str, str]]:
    """WeightRefs of the 2-D LoRA-able weights; `names` maps diffusers parameter name -> stored key."""
    weights: dict[str, WeightRef] = {}
    original: dict[str, str] = {}
    for name, key in names.items():
        file, info = tensors[key]
        if not name.endswith(".weight") or len(info.shape) != 2:
            continue
        path = name[: -len(".weight")]
        module = f"{component}.{path}"
        weights[module] = WeightRef(module, file, key, tuple(info.shape), info.dtype)
        orig = diffusers_to_original(path)
        if orig is not None:
            original[module] = orig
    return weights, original


def _order(weights: dict[str, WeightRef]) -> dict[str, WeightRef]:
    """Model order: embedders, blocks by index, proj_out; components in turn."""
    def rank(m: str):
        component, _, path = m.partition(".")
        hit = _BLOCK.match(path)
        if hit:
            return (component, 1, int(hit.group(1)), path)
        return (component, 2 if path == "proj_out" else 0, 0, path)
    return dict(sorted(weights.items(), key=lambda kv: rank(kv[0])))


def _check_whole(names: dict[str, str], where: str) -> None:
    for need in ("patch_embedding.weight", "blocks.0.attn1.to_q.weight", "proj_out.weight"):
        if need not in names:
            raise ModelError(f"{where}: Wan keys but no '{need}' (diffusers name): not a whole Wan transformer "
                             "(a LoRA, or a partial file?)")


# ----------------------------------------------------------------------------- single files


def wan_prefix(keys) -> tuple[str, bool] | None:
    """(prefix, original names?) under which `keys` hold a Wan transformer, else None.

    Original names (`blocks.0.self_attn.q.weight`, `head.head.weight`) bare or under ComfyUI's
    `model.diffusion_model.`; diffusers names (`blocks.0.attn1.to_q.weight` with
    `condition_embedder.`) as diffusers-format single files have them."""
    keys = set(keys)
    for prefix in PREFIXES:
        if f"{prefix}blocks.0.self_attn.q.weight" in keys and f"{prefix}patch_embedding.weight" in keys:
            return prefix, True
        if f"{prefix}blocks.0.attn1.to_q.weight" in keys and f"{prefix}scale_shift_table" in keys and \
                f"{prefix}condition_embedder.time_proj.weight" in keys:
            return prefix, False
    return None


def open_wan_single_file(path: Path, header: Header | None = None) -> WanModel:
    """A Wan single file: original keys (bare, or under `model.diffusion_model.` as ComfyUI saves
    them, e.g. wan2.2_t2v_high_noise_14B_fp16.safetensors) or diffusers keys."""
    header = header or read_header(path)
    found = wan_prefix(header.tensors)
    if found is None:
        raise ModelError(f"{path}: no Wan transformer keys (blocks.N.self_attn.q / blocks.N.attn1.to_q)")
    prefix, orig_names = found
    tensors = {k: (path, info) for k, info in header.tensors.items()}
    names: dict[str, str] = {}
    unmapped: list[str] = []
    for key in tensors:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        d = original_to_diffusers(name) if orig_names else name
        if d is None:
            unmapped.append(name)
        else:
            names[d] = key
    _check_whole(names, str(path))
    weights, original = _weights(tensors, names)
    shapes = {n: tuple(tensors[k][1].shape) for n, k in names.items()}
    facts = _structure(shapes, shapes.get("patch_embedding.weight"))
    if unmapped:
        facts["unmapped"] = sorted(unmapped)
    return WanModel(path=path, name=path.stem, layout="single-file", family=_family(facts), weights=_order(weights),
                    files={"single-file": path}, headers={path: header}, original=original, facts=facts)


# ----------------------------------------------------------------------------- diffusers folders


def _class_name(folder: Path) -> str:
    try:
        return str(json.loads((folder / "config.json").read_text()).get("_class_name", ""))
    except (OSError, ValueError):
        return ""


def is_wan_folder(path: Path) -> bool:
    """A diffusers Wan pipeline folder (transformer/ and/or transformer_2/ with a
    WanTransformer3DModel) or a bare Wan transformer folder."""
    return any(_class_name(f) == "WanTransformer3DModel"
               for f in (path, path / "transformer", path / "transformer_2"))


def expert_targets(path) -> dict[str, Path] | None:
    """{"high_noise": path/transformer, "low_noise": path/transformer_2} for a Wan 2.2 A14B
    diffusers folder holding both experts, else None."""
    p = Path(path)
    if not p.is_dir():
        return None
    folders = {label: p / comp for label, comp in EXPERTS.items()}
    if all(_class_name(f) == "WanTransformer3DModel" for f in folders.values()):
        return folders
    return None


def transformers_from_diffusers(parts: dict[str, dict[str, tuple[Path, TensorInfo]]], where: object,
                                boundary_ratio: float | None = None
                                ) -> tuple[dict[str, WeightRef], dict[str, str], dict]:
    """One or both experts stored under diffusers WanTransformer3DModel names (component folders,
    or modules' state dicts held in memory), `parts`: component ("transformer", "transformer_2")
    -> its tensors. Returns the weights (`<component>.<diffusers path>`), their original Wan names
    and the structure facts; two experts must share one layout and are named in facts["experts"]."""
    weights: dict[str, WeightRef] = {}
    original: dict[str, str] = {}
    per: dict[str, dict] = {}
    for component, tensors in parts.items():
        names = {k: k for k in tensors}
        _check_whole(names, f"{where}/{component}" if len(parts) > 1 else str(where))
        w, o = _weights(tensors, names, component)
        weights.update(w)
        original.update(o)
        shapes = {k: tuple(info.shape) for k, (_, info) in tensors.items()}
        per[component] = _structure(shapes, shapes.get("patch_embedding.weight"))
    facts = dict(per[next(iter(parts))])
    if len(parts) == 2:
        if per["transformer"] != per["transformer_2"]:
            raise ModelError(f"{where}: transformer and transformer_2 differ in layout ({per['transformer']} vs "
                             f"{per['transformer_2']}); Wan 2.2 A14B experts share one")
        facts["experts"] = dict(EXPERTS)
        if boundary_ratio is not None:
            facts["boundary_ratio"] = boundary_ratio
    return _order(weights), original, facts


def open_wan_folder(path: Path) -> WanModel:
    """A diffusers folder: a bare transformer folder, a pipeline with transformer/ (Wan 2.1), or a
    Wan 2.2 A14B pipeline with both experts (transformer/ high-noise, transformer_2/ low-noise:
    weights `transformer.*` and `transformer_2.*`). Shards and the fp16 variant are read like any
    diffusers component. Text encoder and VAE are not read (LoRAs for Wan adapt the transformer)."""
    from ...checkpoints.folders import read_component

    files: dict[str, Path] = {}
    headers: dict[Path, Header] = {}
    if _class_name(path) == "WanTransformer3DModel":
        parts = {COMPONENT: path}
    else:
        parts = {c: path / c for c in EXPERTS.values() if _class_name(path / c) == "WanTransformer3DModel"}
    if not parts:
        raise ModelError(f"{path}: no WanTransformer3DModel in config.json, transformer/ or transformer_2/")
    boundary = None
    if len(parts) == 2:
        try:
            boundary = json.loads((path / "model_index.json").read_text()).get("boundary_ratio")
        except (OSError, ValueError):
            pass
    weights, original, facts = transformers_from_diffusers(
        {c: read_component(folder, path, files, headers) for c, folder in parts.items()}, path, boundary)
    return WanModel(path=path, name=path.name, layout="diffusers", family=_family(facts), weights=weights,
                    files=files, headers=headers, original=original, facts=facts)


# ----------------------------------------------------------------------------- pairs


def pair_refusal(source: BaseModel, target: BaseModel, widths: str = "refuse") -> str | None:
    """Why a transfer between these two models must not run (None: it may). Wan only: a model
    that holds two experts is no single source or target, and models of other widths (Wan 2.2
    TI2V-5B vs a 14B layout) share no layer shape, unless `widths` is "lstsq"."""
    if not (isinstance(source, WanModel) or isinstance(target, WanModel)):
        return None
    for role, m in (("source", source), ("target", target)):
        if isinstance(m, WanModel) and m.experts and m.layout == "memory":
            return (f"{role} {m.name} is a pipeline holding both Wan 2.2 experts; pass one (pipe.transformer is the "
                    "high-noise, pipe.transformer_2 the low-noise expert), or load the LoRA onto both with "
                    "prolora.diffusers.load_lora(pipe, ...), which transfers it onto each expert")
        if isinstance(m, WanModel) and m.experts:
            return (f"{role} {m.path} holds both Wan 2.2 experts; name one ({m.path}/transformer is the high-noise, "
                    f"{m.path}/transformer_2 the low-noise expert), or transfer to the folder with "
                    "prolora.api.transfer_files / `prolora transfer`, which writes one LoRA per expert")
    if not (isinstance(source, WanModel) and isinstance(target, WanModel)):
        return None
    if source.hidden != target.hidden and widths != "lstsq":
        what = lambda m: f"{m.name} ({m.family}, {m.facts.get('variant')}, width {m.hidden})"  # noqa: E731
        return (f"source {what(source)} and target {what(target)} have different widths, so no layer has the same "
                "shape (Wan 2.2 TI2V-5B is a model of its own, not a 14B expert); pass --widths lstsq to map each "
                "layer by LoRA-X's least-squares map where the two subspaces agree")
    return None


def expert_label(path) -> str | None:
    """"high_noise" / "low_noise" when a file or folder name says so (ComfyUI's split files), else None."""
    name = Path(path).name.lower().replace("-", "_")
    for label in EXPERTS:
        if label in name:
            return label
    return None


# ----------------------------------------------------------------------------- loader padding


def pad_musubi_blocks(modules: dict, fmt: str, model: BaseModel) -> list[str]:
    """Add zero-delta modules (up = 0: merged weights unchanged) to a kohya/musubi Wan output
    where diffusers' loader would fail: its musubi converter (0.42,
    `_convert_musubi_wan_lora_to_diffusers`) reads every q/k/v/o of both attentions and ffn.0/ffn.2
    of blocks 0..n-1 (n = the number of blocks named) and raises on any that is missing, e.g. a
    layer the similarity gate dropped. Returns one warning, or none when nothing was added."""
    if fmt != "kohya" or not isinstance(model, WanModel):
        return []
    from ...compat import _common  # compat imports the checkpoints package

    have = {model.resolve(k)[0] for k in modules if model.resolve(k) is not None}
    blocks = {int(m.group(1)) for m in (_BLOCK.match(h.partition(".")[2]) for h in have) if m}
    if not blocks:
        return []
    rank, alpha, dtype = _common(modules.values())
    roles = [r for r in BLOCK_LINEARS if not r.endswith("_img")]
    added = []
    for i in range(max(blocks) + 1):  # the converter counts the blocks named and reads 0..n-1
        for role in roles:
            module = f"{COMPONENT}.blocks.{i}.{BLOCK_LINEARS[role]}"
            ref = model.weights.get(module)
            if module in have or ref is None:
                continue
            key = model.spell(module, "kohya-ldm")
            modules[key] = LoraModule(key, torch.zeros(rank, ref.shape[1], dtype=dtype),
                                      torch.zeros(ref.shape[0], rank, dtype=dtype), alpha)
            added.append(module)
    if not added:
        return []
    return [f"added {len(added)} zero-delta modules (e.g. {added[0]}) so that diffusers' musubi-tuner converter, "
            "which needs every attention and ffn module of each block it counts, loads the file"]
