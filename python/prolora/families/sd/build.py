"""UNet components from a header's keys (diffusers or LDM/SGM names), and the SdModel they and
the text encoders make, its family read from the structure."""
from __future__ import annotations

from pathlib import Path

from ...checkpoints.encoders import Component, Tensors
from ...checkpoints.model import WeightRef
from ...errors import ModelError
from ...safetensors_io import Header, TensorInfo
from .detect import detect_family, unet_stats
from .model import SdModel
from .unet_keys import diffusers_to_ldm, ldm_to_diffusers


def _is_unet_weight(info: TensorInfo) -> bool:
    return info.name.endswith(".weight") and len(info.shape) in (2, 4)


def unet_from_diffusers(tensors: Tensors, where: str, prefix: str = "") -> Component:
    """UNet whose keys are diffusers names (after `prefix`).

    Every weight is kept; LDM/SGM names (for the kohya-ldm and comfy spellings) are derived where
    the layout has them: a UNet of an unusual structure simply gets none.
    """
    names = {k[len(prefix):]: k for k in tensors if k.startswith(prefix)}
    try:
        d2l, structure = diffusers_to_ldm(names, where, strict=False)
    except ModelError:
        d2l, structure = {}, None
    comp = Component("unet", structure=structure)
    for name, key in names.items():
        path, info = tensors[key]
        if _is_unet_weight(info):
            module = "unet." + name[: -len(".weight")]
            comp.weights[module] = WeightRef(module, path, key, info.shape, info.dtype)
            if name in d2l:
                comp.ldm_names[module] = d2l[name][: -len(".weight")]
    return comp


def unet_from_ldm(tensors: Tensors, where: str, prefix: str) -> Component:
    """UNet whose keys are LDM/SGM names under `prefix` (e.g. `model.diffusion_model.`)."""
    names = {k[len(prefix):]: k for k in tensors if k.startswith(prefix)}
    l2d, structure = ldm_to_diffusers(names, where)
    comp = Component("unet", structure=structure)
    for name, key in names.items():
        path, info = tensors[key]
        if _is_unet_weight(info):
            module = "unet." + l2d[name][: -len(".weight")]
            if module in comp.weights:
                raise ModelError(f"{where}: '{key}' and '{comp.weights[module].key}' map to the same weight")
            comp.weights[module] = WeightRef(module, path, key, info.shape, info.dtype)
            comp.ldm_names[module] = name[: -len(".weight")]
    return comp


def assemble(path: Path, layout: str, components: list[Component], files: dict[str, Path],
             headers: dict[Path, Header], name: str | None = None) -> SdModel:
    """An SdModel from components; the family is read from their structure."""
    weights: dict[str, WeightRef] = {}
    ldm_names: dict[str, str] = {}
    structure = None
    encoders: dict[str, dict] = {}
    has_unet = False
    for comp in components:
        if not comp.weights:
            continue
        weights.update(comp.weights)
        ldm_names.update(comp.ldm_names)
        if comp.name == "unet":
            structure, has_unet = comp.structure, True
        else:
            encoders[comp.name] = comp.facts
    if not weights:
        raise ModelError(f"{path}: no UNet or text-encoder weights found")
    if has_unet:
        te_hidden = {c: f["hidden"] for c, f in encoders.items() if f.get("hidden")}
        family = detect_family(unet_stats({m: r.shape for m, r in weights.items()}), te_hidden)
    else:
        family = "unknown"
    return SdModel(path=path, name=name or path.name, layout=layout, family=family, weights=weights,
                   files=files, headers=headers, ldm_names=ldm_names, structure=structure,
                   text_encoders=encoders)
