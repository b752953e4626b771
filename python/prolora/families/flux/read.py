"""Readers of FLUX.1 / Chroma models: BFL single files (bare keys or ComfyUI's
`model.diffusion_model.`, with the CLIP-L / T5 an all-in-one file carries) and diffusers folders
(a pipeline with transformer/ and its text encoders, or a bare transformer folder).

Detection is strict: a file is claimed only with FLUX.1's or Chroma's markers and none of FLUX.2's
(keys.is_flux_keys); a folder only when its transformer's config names FluxTransformer2DModel or
ChromaTransformer2DModel exactly (Flux2Transformer2DModel shares the "Flux" and 39 weight names,
and is not FLUX.1).
"""
from __future__ import annotations

import json
from pathlib import Path

from ...checkpoints.encoders import Component, Tensors, clip_from_transformers, t5_from_transformers
from ...checkpoints.folders import class_name, read_component
from ...checkpoints.model import WeightRef
from ...errors import ModelError
from ...safetensors_io import Header, TensorInfo, read_header
from .chroma import member
from .keys import (COMPONENT, D_APPROX, D_DOUBLE, D_SINGLE, GUIDANCE, T5, T5_COMFY, BflPlace, bfl_to_diffusers,
                   diffusers_to_bfl, is_flux_keys, partial_flux_key)
from .model import FluxModel

# the diffusers classes of the transformers this family reads, by config `_class_name`
CLASSES = ("FluxTransformer2DModel", "ChromaTransformer2DModel")


def _structure_facts(modules: dict[str, tuple[int, ...]], unmapped: list[str]) -> dict:
    double = {int(m.group(1)) for m in map(D_DOUBLE.match, modules) if m}
    single = {int(m.group(1)) for m in map(D_SINGLE.match, modules) if m}
    q = modules.get("single_transformer_blocks.0.attn.to_q") or modules.get("transformer_blocks.0.attn.to_q")
    mlp = modules.get("single_transformer_blocks.0.proj_mlp") or modules.get("transformer_blocks.0.ff.net.0.proj")
    facts = {"double_blocks": len(double), "single_blocks": len(single), "hidden": q[0] if q else None,
             "mlp_hidden": mlp[0] if mlp else None,
             "guidance_embedder": any(m.startswith(GUIDANCE) for m in modules),
             "approximator_layers": len({int(m.group(1)) for m in map(D_APPROX.match, modules) if m})}
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


def order(weights: dict[str, WeightRef]) -> dict[str, WeightRef]:
    """Model order: embedders, double blocks, single blocks (by index), final layer."""
    def rank(m: str):
        path = m.partition(".")[2]
        for i, rx in enumerate((D_DOUBLE, D_SINGLE)):
            hit = rx.match(path)
            if hit:
                return (1 + i, int(hit.group(1)), path)
        return (3 if path in ("proj_out", "norm_out.linear") else 0, 0, path)
    return dict(sorted(weights.items(), key=lambda kv: (not kv[0].startswith(COMPONENT + "."), rank(kv[0]))))


def claim_file(path: Path, header: Header) -> FluxModel | None:
    """A FLUX.1 / Chroma BFL single file (see `open_single_file`); None when the file has no
    FLUX.1 / Chroma markers (or has FLUX.2's); ModelError for a part of a Flux transformer."""
    prefix = is_flux_keys(header.tensors)
    if prefix is None:
        part = partial_flux_key(header.tensors)
        if part is not None:
            raise ModelError(f"{path}: Flux (BFL) keys (e.g. '{part}') but no FLUX.1 modulation (img_mod) or "
                             "Chroma approximator: not a whole Flux transformer (a LoRA, or a partial file?)")
        return None
    return _open_single_file(path, header, prefix)


def open_single_file(path: Path, header: Header | None = None) -> FluxModel:
    """A BFL single file (bare keys, or ComfyUI's `model.diffusion_model.`); a CLIP-L stored as
    `text_encoders.clip_l.transformer.` and a T5 as `text_encoders.t5xxl.transformer.` are read too."""
    header = header or read_header(path)
    prefix = is_flux_keys(header.tensors)
    if prefix is None:
        raise ModelError(f"{path}: no FLUX.1 (BFL) transformer keys (double_blocks.N.img_mod / "
                         "single_blocks.N.modulation / distilled_guidance_layer)")
    return _open_single_file(path, header, prefix)


def _open_single_file(path: Path, header: Header, prefix: str) -> FluxModel:
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
    return FluxModel(path=path, name=path.stem, layout="single-file", family=member(weights), weights=order(weights),
                     files={"single-file": path}, headers={path: header}, text_encoders=encoders,
                     bfl=bfl, facts=facts)


# ------------------------------------------------------------------------------------ folders


def is_flux_folder(path: Path) -> bool:
    """A diffusers pipeline folder whose transformer/ holds a FluxTransformer2DModel or a
    ChromaTransformer2DModel (by its config's `_class_name`, exactly), or such a bare transformer
    folder."""
    if (path / "unet").is_dir():
        return False
    folder = path / COMPONENT if (path / COMPONENT).is_dir() else path
    return class_name(folder / "config.json") in CLASSES


def claim_folder(path: Path) -> FluxModel | None:
    """A FLUX.1 / Chroma diffusers folder (see `is_flux_folder`), else None."""
    return open_folder(path) if is_flux_folder(path) else None


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



def open_folder(path: Path) -> FluxModel:
    """A diffusers folder: a pipeline with transformer/ (sharded or not) and optionally CLIP-L in
    text_encoder/ and T5 in text_encoder_2/, or a bare transformer folder."""
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
    return FluxModel(path=path, name=path.name, layout="diffusers", family=member(weights), weights=order(weights),
                     files=files, headers=headers, text_encoders=encoders, bfl=bfl, facts=facts,
                     t5_component=t5_component)


def _is_t5(folder: Path) -> bool:
    """A transformers T5 encoder folder (config.json model_type "t5" / T5EncoderModel)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return cfg.get("model_type") in ("t5", "umt5") or any("T5" in a for a in cfg.get("architectures") or [])
