"""Wan transformers on disk: single files (original keys bare or under ComfyUI's prefixes, or
diffusers keys) and diffusers folders (a bare transformer folder, a pipeline with transformer/,
a Wan 2.2 A14B pipeline with both experts), as claim_file / claim_folder.

Members: "wan", the 16-channel latent models (VAE 2.1): Wan 2.1 T2V/I2V 14B and 1.3B, and each
expert of Wan 2.2 T2V/I2V A14B, which has the 2.1 14B layout (40 blocks, width 5120); "wan-ti2v",
Wan 2.2 TI2V-5B, whose VAE 2.2 latent has 48 channels (patch_embedding input and proj_out rows
tell it apart at any size; at full size it is 30 blocks of width 3072).
"""
from __future__ import annotations

import json
from pathlib import Path

from ...checkpoints.folders import class_name, read_component
from ...checkpoints.model import WeightRef
from ...errors import ModelError
from ...safetensors_io import Header, TensorInfo, read_header
from .experts import EXPERTS
from .keys import (BLOCK, CLASS, COMPONENT, OTHER_ARCHITECTURES, PREFIXES, TI2V_LATENT, diffusers_to_original,
                   original_to_diffusers)
from .model import WanModel


def claim_file(path: Path, header: Header) -> WanModel | None:
    """The Wan model of a single file whose keys hold a Wan transformer (wan_prefix), else None."""
    return open_wan_single_file(path, header) if wan_prefix(header.tensors) is not None else None


def claim_folder(path: Path) -> WanModel | None:
    """The Wan model of a diffusers folder whose config names WanTransformer3DModel, else None (a
    folder with unet/ is an SD pipeline's)."""
    return open_wan_folder(path) if not (path / "unet").is_dir() and is_wan_folder(path) else None


# ----------------------------------------------------------------------------- structure


def _structure(shapes: dict[str, tuple[int, ...]], patch: tuple[int, ...] | None) -> dict:
    """Facts from {diffusers parameter name: shape} of one transformer: blocks, widths, channels,
    which Wan model it looks like."""
    blocks = {int(m.group(1)) for m in map(BLOCK.match, shapes) if m}
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
    wider_in = in_ch is not None and out_ch is not None and in_ch > out_ch  # I2V: image latents in
    kind = "TI2V" if out_ch == TI2V_LATENT else "I2V" if wider_in or i2v else "T2V"
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
        hit = BLOCK.match(path)
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
    `condition_embedder.`) as diffusers-format single files have them. Keys of another architecture
    on Wan's blocks (VACE, Animate: keys.OTHER_ARCHITECTURES) make it None: those are not Wan."""
    keys = set(keys)
    for prefix in PREFIXES:
        if f"{prefix}blocks.0.self_attn.q.weight" in keys and f"{prefix}patch_embedding.weight" in keys:
            found = prefix, True
        elif f"{prefix}blocks.0.attn1.to_q.weight" in keys and f"{prefix}scale_shift_table" in keys and \
                f"{prefix}condition_embedder.time_proj.weight" in keys:
            found = prefix, False
        else:
            continue
        other = tuple(prefix + m for m in OTHER_ARCHITECTURES)
        return None if any(k.startswith(other) for k in keys) else found
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


def is_wan_folder(path: Path) -> bool:
    """A diffusers Wan pipeline folder (transformer/ and/or transformer_2/ with a
    WanTransformer3DModel, by the config's class exactly) or a bare Wan transformer folder."""
    return any(class_name(f / "config.json") == CLASS for f in (path, path / "transformer", path / "transformer_2"))


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
    files: dict[str, Path] = {}
    headers: dict[Path, Header] = {}
    if class_name(path / "config.json") == CLASS:
        parts = {COMPONENT: path}
    else:
        parts = {c: path / c for c in EXPERTS.values() if class_name(path / c / "config.json") == CLASS}
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
