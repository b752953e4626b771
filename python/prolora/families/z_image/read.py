"""Z-Image on disk: single files (ComfyUI's original names with the fused attention, or diffusers'
names; bare or under `model.diffusion_model.`) and diffusers folders (a pipeline with transformer/,
or the bare transformer folder), as claim_file / claim_folder; and the transformer from diffusers
names, which the in-memory reader shares.

Detection is strict: a file is claimed only with diffusers' own Z-Image marker (a main block's
`adaLN_modulation.0`, keys.is_z_image_keys), which Lumina 2's files (the same original names,
`adaLN_modulation.1`) do not have; a folder only when its transformer's config names
ZImageTransformer2DModel exactly.
"""
from __future__ import annotations

from pathlib import Path

from ...checkpoints.folders import class_name, config_of, read_component
from ...checkpoints.model import WeightRef
from ...errors import ModelError
from ...safetensors_io import Header, TensorInfo, read_header
from .keys import (BLOCK, BLOCK_GROUPS, BLOCK_LINEARS, CLASS, COMPONENT, FUSED, MEMBER, OTHER, QKV, TOP, is_z_image_keys,
                   original_to_diffusers)
from .model import ZImageModel

Tensors = dict[str, tuple[Path, TensorInfo]]


def claim_file(path: Path, header: Header) -> ZImageModel | None:
    """The model of a single file whose keys hold a Z-Image transformer, else None."""
    shapes = {k: tuple(i.shape) for k, i in header.tensors.items()}
    found = is_z_image_keys(header.tensors, shapes)
    return open_single_file(path, header, *found) if found is not None else None


def claim_folder(path: Path) -> ZImageModel | None:
    """The model of a diffusers folder whose config names ZImageTransformer2DModel exactly, else
    None (a folder with unet/ is an SD pipeline's)."""
    if (path / "unet").is_dir() or CLASS not in (class_name(path / COMPONENT / "config.json"),
                                                 class_name(path / "config.json")):
        return None
    return open_folder(path)


def _order(weights: dict[str, WeightRef]) -> dict[str, WeightRef]:
    """Model order: embedders, the refiners, the main blocks (each block's linears in
    BLOCK_LINEARS order), the final layer."""
    role = {r: i for i, r in enumerate(BLOCK_LINEARS)}

    def rank(module: str):
        path = module.partition(".")[2]
        m = BLOCK.match(path)
        if m:
            return (1, BLOCK_GROUPS.index(m.group(1)), int(m.group(2)), role.get(m.group(3), len(role)), path)
        return (2 if path.startswith("all_final_layer.") else 0, 0, 0, 0, path)
    return dict(sorted(weights.items(), key=lambda kv: rank(kv[0])))


def _facts(weights: dict[str, WeightRef], tensors: Tensors, prefix: str) -> dict:
    """Block counts and widths, read from the shapes (so tiny test models report their own)."""
    shapes = {m.partition(".")[2]: r.shape for m, r in weights.items()}
    facts: dict = {}
    for group in BLOCK_GROUPS:
        n = len({int(m.group(2)) for m in map(BLOCK.match, shapes) if m and m.group(1) == group})
        if n or group != "siglip_refiner":
            facts[group] = n
    q, w1, cap = (shapes.get(k) for k in ("layers.0.attention.to_q", "layers.0.feed_forward.w1", "cap_embedder.1"))
    facts.update({"hidden": q[0] if q else None, "ffn_hidden": w1[0] if w1 else None,
                  "cap_feat_dim": cap[1] if cap else None})
    norm = next((tensors[prefix + k][1].shape for k in ("layers.0.attention.norm_q.weight",
                                                        "layers.0.attention.q_norm.weight") if prefix + k in tensors), None)
    if q and norm:
        facts["heads"] = q[0] // norm[0]
    return facts


def _weights(tensors: Tensors, prefix: str, naming: str) -> dict[str, WeightRef]:
    """Every LoRA-able linear under `prefix`, by canonical id; an original file's fused attention
    as its three row slices."""
    weights: dict[str, WeightRef] = {}
    for key, (file, info) in tensors.items():
        if not key.startswith(prefix) or not key.endswith(".weight") or len(info.shape) != 2:
            continue
        path = key[len(prefix): -len(".weight")]
        if not (path + ".").startswith(TOP):
            continue
        if naming == "original" and path.endswith("." + FUSED):
            rows, cols = info.shape
            if rows % 3:
                raise ModelError(f"{file}: '{key}' has {rows} rows, not 3 equal slices (q, k, v)")
            block = path[: -len(FUSED)]
            for i, name in enumerate(QKV):
                module = f"{COMPONENT}.{block}{name}"
                a, b = i * rows // 3, (i + 1) * rows // 3
                weights[module] = WeightRef(module, file, key, (b - a, cols), info.dtype, rows=(a, b))
            continue
        module = f"{COMPONENT}.{original_to_diffusers(path) if naming == 'original' else path}"
        weights[module] = WeightRef(module, file, key, tuple(info.shape), info.dtype)
    return _order(weights)


def _check_whole(weights: dict[str, WeightRef], where: object) -> None:
    if not any(m.startswith(f"{COMPONENT}.all_x_embedder.") for m in weights) or \
            not any(m.startswith(f"{COMPONENT}.all_final_layer.") for m in weights):
        raise ModelError(f"{where}: Z-Image keys but no x_embedder / final_layer: not a whole Z-Image transformer "
                         "(a LoRA, or a partial file?)")


def open_single_file(path: Path, header: Header | None = None, prefix: str | None = None,
                     naming: str | None = None) -> ZImageModel:
    """A single file with the transformer's original names (fused attention, ComfyUI's) or
    diffusers' names, bare or under `model.diffusion_model.`."""
    header = header or read_header(path)
    if prefix is None or naming is None:
        found = is_z_image_keys(header.tensors, {k: tuple(i.shape) for k, i in header.tensors.items()})
        if found is None:
            raise ModelError(f"{path}: no Z-Image transformer keys (layers.0.adaLN_modulation.0, cap_embedder.1)")
        prefix, naming = found
    tensors = {k: (path, info) for k, info in header.tensors.items()}
    weights = _weights(tensors, prefix, naming)
    _check_whole(weights, path)
    facts = _facts(weights, tensors, prefix)
    facts.update({"prefix": prefix, "naming": naming})
    other = sum(1 for k in header.tensors if not (k.startswith(prefix) and k[len(prefix):].startswith(TOP + OTHER)))
    if other:
        facts["keys_not_read"] = other  # an all-in-one file's text encoder / VAE
    return ZImageModel(path=path, name=path.stem, layout="single-file", family=MEMBER, weights=weights,
                       files={"single-file": path}, headers={path: header}, facts=facts)


def transformer_from_diffusers(tensors: Tensors, where: object, config: dict | None = None) -> tuple[dict, dict]:
    """A transformer stored under diffusers ZImageTransformer2DModel names (a transformer/ folder,
    or a module's state dict held in memory): its LoRA-able weights and the structure facts."""
    weights = _weights(tensors, "", "diffusers")
    _check_whole(weights, where)
    facts = _facts(weights, tensors, "")
    if config and config.get("siglip_feat_dim"):
        facts["siglip_feat_dim"] = config["siglip_feat_dim"]  # Z-Image-Omni
    return weights, facts


def open_folder(path: Path) -> ZImageModel:
    """A pipeline folder with transformer/ (sharded or not), or the bare transformer folder. The
    text encoder (Qwen3) and the VAE are not read."""
    files: dict[str, Path] = {}
    headers: dict[Path, Header] = {}
    folder = path / COMPONENT if (path / COMPONENT).is_dir() else path
    weights, facts = transformer_from_diffusers(read_component(folder, path, files, headers), folder,
                                                config_of(folder))
    if folder != path:
        pipeline = class_name(path / "model_index.json")
        if pipeline:
            facts["pipeline"] = pipeline
        if (path / "text_encoder").is_dir():
            facts["text_encoder"] = "Qwen3, not read (not a LoRA target of the Z-Image trainers)"
    return ZImageModel(path=path, name=path.name, layout="diffusers", family=MEMBER, weights=weights, files=files,
                       headers=headers, facts=facts)
