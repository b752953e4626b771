"""FLUX.2 on disk: BFL single files (bare keys, or under ComfyUI's `model.diffusion_model.`) and
diffusers folders (a Flux2Pipeline / Flux2KleinPipeline folder with transformer/, or the bare
transformer folder), as claim_file / claim_folder; and the transformer from diffusers names, which
the in-memory reader shares.

Detection is strict: a file is claimed only with FLUX.2's shared modulation (keys.MARKERS, what
diffusers' single-file loader tells "flux2" by) and none of FLUX.3's; a folder only when its
transformer's config names Flux2Transformer2DModel exactly. Every required weight must be there
and the single blocks' fused rows must add up (3h + 2m); otherwise it is refused as not whole.
"""
from __future__ import annotations

import json
from pathlib import Path

from ...checkpoints.folders import class_name, read_component
from ...checkpoints.model import WeightRef
from ...errors import ModelError
from ...safetensors_io import Header, TensorInfo
from .keys import CLASS, COMPONENT, MEMBER, Place, bfl_prefix, describe, places, structure
from .model import Flux2Model

Tensors = dict[str, tuple[Path, TensorInfo]]


def weights_from(tensors: Tensors, prefix: str, bfl: bool, where: object) -> tuple[dict[str, WeightRef], dict[str, Place], dict]:
    """The canonical weights of a FLUX.2 transformer stored under BFL (`bfl`) or diffusers names
    (after `prefix`), their places and the structure facts."""
    shapes = {}
    for key, (_, info) in tensors.items():
        if key.startswith(prefix) and key.endswith(".weight") and len(info.shape) == 2:
            shapes[key[len(prefix): -len(".weight")]] = tuple(info.shape)
    s = structure(shapes, bfl, where)
    weights: dict[str, WeightRef] = {}
    table: dict[str, Place] = {}
    filled: dict[str, int] = {}
    for p in places(s):
        stored, rows = (p.bfl, p.bfl_rows) if bfl else (p.dif, p.dif_rows)
        key = f"{prefix}{stored}.weight"
        if key not in tensors:
            raise ModelError(f"{where}: FLUX.2 transformer without '{key}' (a partial file?)")
        file, info = tensors[key]
        shape = tuple(info.shape)
        module = f"{COMPONENT}.{p.path}"
        if rows is None:
            ref = WeightRef(module, file, key, shape, info.dtype)
        elif len(rows) == 1:
            (a, b), = rows
            ref = WeightRef(module, file, key, (b - a, *shape[1:]), info.dtype, rows=(a, b))
        else:
            ref = WeightRef(module, file, key, (sum(b - a for a, b in rows), *shape[1:]), info.dtype, pieces=rows)
        filled[key] = filled.get(key, 0) + ref.shape[0]
        weights[module] = ref
        table[module] = p
    for key, n in filled.items():
        if n != tensors[key][1].shape[0]:
            raise ModelError(f"{where}: '{key}' has {tensors[key][1].shape[0]} rows, its slices {n}: not FLUX.2's layout")
    used = {k[len(prefix): -len(".weight")] for k in filled}
    facts = {"double_blocks": s.double, "single_blocks": s.single, "hidden": s.hidden, "mlp_hidden": s.mlp,
             "guidance_embedder": s.guidance, "size": describe(s)}
    unmapped = sorted(k for k in shapes if k not in used)
    if unmapped:
        facts["unmapped"] = unmapped
    return weights, table, facts


def claim_file(path: Path, header: Header) -> Flux2Model | None:
    """A FLUX.2 BFL single file (bare keys or under `model.diffusion_model.`); None when it has no
    FLUX.2 marker; ModelError when it has one but is no whole transformer."""
    prefix = bfl_prefix(header.tensors)
    if prefix is None:
        return None
    tensors = {k: (path, info) for k, info in header.tensors.items()}
    weights, table, facts = weights_from(tensors, prefix, True, path)
    facts["prefix"] = prefix
    other = sum(1 for k in header.tensors if not k.startswith(prefix))
    if other:
        facts["keys_not_read"] = other  # an all-in-one file's text encoder / VAE
    return Flux2Model(path=path, name=path.stem, layout="single-file", family=MEMBER, weights=weights,
                      files={"single-file": path}, headers={path: header}, places=table, facts=facts,
                      variant=facts["size"])


def is_flux2_folder(path: Path) -> bool:
    """A diffusers folder whose transformer/ (or itself, a bare transformer folder) holds a
    Flux2Transformer2DModel, by its config's `_class_name` exactly."""
    if (path / "unet").is_dir():
        return False
    folder = path / COMPONENT if (path / COMPONENT).is_dir() else path
    return class_name(folder / "config.json") == CLASS


def claim_folder(path: Path) -> Flux2Model | None:
    """A FLUX.2 diffusers folder (see `is_flux2_folder`), else None."""
    return open_folder(path) if is_flux2_folder(path) else None


def variant(size: str, pipeline: str, config: dict) -> tuple[str, dict]:
    """The variant ("klein-4b", "klein-4b-base", "dev", ...) and the pipeline's facts: a
    Flux2KleinPipeline's `is_distilled` tells the distilled [klein] from its base."""
    facts: dict = {}
    if pipeline:
        facts["pipeline"] = pipeline
    if "is_distilled" in config:
        facts["distilled"] = bool(config["is_distilled"])
        if not config["is_distilled"] and size.startswith("klein"):
            return f"{size}-base", facts
    return size, facts


def open_folder(path: Path) -> Flux2Model:
    """A pipeline folder with transformer/ (sharded or not), or the bare transformer folder. The
    text encoder (Qwen3 / Mistral) and the VAE are not read."""
    files: dict[str, Path] = {}
    headers: dict[Path, Header] = {}
    folder = path / COMPONENT if (path / COMPONENT).is_dir() else path
    tensors = read_component(folder, path, files, headers)
    weights, table, facts = weights_from(tensors, "", False, folder)
    pipeline, index = "", {}
    if folder != path:
        try:
            index = json.loads((path / "model_index.json").read_text())
        except (OSError, ValueError):
            index = {}
        pipeline = str(index.get("_class_name", "")) if isinstance(index, dict) else ""
    name, more = variant(facts["size"], pipeline, index if isinstance(index, dict) else {})
    facts.update(more)
    if folder != path and (path / "text_encoder").is_dir():
        facts["text_encoder"] = "not read (prolora transfers the transformer's LoRA modules)"
    return Flux2Model(path=path, name=path.name, layout="diffusers", family=MEMBER, weights=weights, files=files,
                      headers=headers, places=table, facts=facts, variant=name)
