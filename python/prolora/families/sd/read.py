"""Readers of SD-family models: single-file checkpoints (SD1.x LDM, SD2.x, SDXL SGM; also
UNet-only files with bare LDM keys or diffusers keys) and diffusers folders (a pipeline with
unet/ and its text encoders, or one bare component folder), plus the diffusers -> single-file key
plan used to write single files (and read them backwards, for refine).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...checkpoints.encoders import (CLIP_PREFIXES, OPENCLIP_PREFIXES, Component, Tensors, canonical_clip_name,
                                     clip_from_openclip, clip_from_transformers, transformers_to_openclip)
from ...checkpoints.folders import config_of, read_component
from ...errors import ModelError
from ...safetensors_io import Header, read_header
from .build import assemble, unet_from_diffusers, unet_from_ldm
from .model import COMPONENTS, SdModel
from .unet_keys import LDM_ROOTS, diffusers_to_ldm

UNET_PREFIX = "model.diffusion_model."


def _has(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _unet_component(path: Path, tensors: Tensors) -> Component | None:
    """The UNet of a single file, by whichever naming its keys use; None without UNet keys."""
    keys = list(tensors)
    where = str(path)
    if _has(keys, UNET_PREFIX + "input_blocks.") or _has(keys, UNET_PREFIX + "output_blocks."):
        return unet_from_ldm(tensors, where, UNET_PREFIX)
    if _has(keys, "input_blocks.") or _has(keys, "output_blocks."):
        stray = [k for k in keys if not k.startswith(LDM_ROOTS + ("label_emb.",))]
        if stray:
            raise ModelError(f"{path}: UNet key '{stray[0]}' maps nowhere in the LDM -> diffusers map")
        return unet_from_ldm(tensors, where, "")
    if _has(keys, "down_blocks.") and _has(keys, "up_blocks."):
        return unet_from_diffusers(tensors, where)
    return None


def claim_file(path: Path, header: Header) -> SdModel | None:
    """A single-file checkpoint whose UNet keys are LDM/SGM (`model.diffusion_model.*`, bare
    `input_blocks.*`) or diffusers names, with the CLIP / OpenCLIP encoders it carries; None
    when the file holds no UNet."""
    tensors: Tensors = {k: (path, info) for k, info in header.tensors.items()}
    unet = _unet_component(path, tensors)
    if unet is None:
        return None
    comps: list[Component] = [unet]
    keys = list(tensors)
    for prefix, component in CLIP_PREFIXES.items():
        if _has(keys, prefix):  # old SD1 files lack `text_model.`: names are normalised
            comps.append(clip_from_transformers(tensors, component, prefix))
    for prefix, component in OPENCLIP_PREFIXES.items():
        if _has(keys, prefix + "transformer.resblocks."):
            comps.append(clip_from_openclip(tensors, component, prefix, projection=component == "text_encoder_2"))
    return assemble(path, "single-file", comps, {"single-file": path}, {path: header}, name=path.stem)


def open_single_file(path: Path) -> SdModel:
    """Open an SD-family .safetensors checkpoint by its header; UNet keys are required."""
    model = claim_file(path, read_header(path))
    if model is None:
        raise ModelError(f"{path}: no UNet keys (expected 'model.diffusion_model.*', LDM 'input_blocks.*' "
                         "or diffusers 'down_blocks.*'); is this a VAE, a text encoder or a LoRA?")
    return model


# ------------------------------------------------------------------------------------ folders


def _component_kind(folder: Path) -> str | None:
    """"unet", "text_encoder" or "text_encoder_2" for a component folder of this family, else None."""
    if folder.name in COMPONENTS:
        return folder.name
    cfg = config_of(folder)
    if "down_block_types" in cfg or cfg.get("_class_name") == "UNet2DConditionModel":
        return "unet"
    arch = " ".join(cfg.get("architectures") or []) + " " + str(cfg.get("model_type", ""))
    if "clip" in arch.lower():
        return "text_encoder_2" if "WithProjection" in arch else "text_encoder"
    return None


def _read(folder: Path, kind: str, root: Path, files: dict, headers: dict) -> Component:
    tensors = read_component(folder, root, files, headers)
    if kind == "unet":
        return unet_from_diffusers(tensors, str(folder))
    return clip_from_transformers(tensors, kind)


def open_pipeline(path: Path) -> SdModel:
    """A diffusers pipeline folder: unet/ is required, text encoders are read when present."""
    files: dict[str, Path] = {}
    headers: dict[Path, Header] = {}
    comps = [_read(path / c, c, path, files, headers) for c in COMPONENTS if (path / c).is_dir()]
    return assemble(path, "diffusers", comps, files, headers)


def claim_folder(path: Path) -> SdModel | None:
    """A pipeline folder with unet/, or one bare UNet / CLIP component folder; None otherwise."""
    if (path / "unet").is_dir():
        return open_pipeline(path)
    if (path / "model_index.json").is_file() or not (path / "config.json").is_file():
        return None
    kind = _component_kind(path)
    if kind is None:
        return None
    files: dict[str, Path] = {}
    headers: dict[Path, Header] = {}
    return assemble(path, "diffusers", [_read(path, kind, path, files, headers)], files, headers)


# ------------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class FileEntry:
    """One tensor of a single file, built from diffusers/transformers parameters.

    `sources`: (component, parameter name) pairs; several are concatenated along dim 0 (fused
    q, k, v); `transpose` for OpenCLIP's text_projection.
    """

    key: str
    shape: tuple[int, ...]
    sources: tuple[tuple[str, str], ...]
    transpose: bool = False


def single_file_plan(params: dict[str, list[tuple[str, tuple[int, ...]]]], openclip_te1: bool = False) -> list[FileEntry]:
    """How to lay out a single file from {component: [(diffusers/transformers name, shape)]}.

    SD1.x: UNet under `model.diffusion_model.`, CLIP-L under `cond_stage_model.transformer.`.
    SDXL (a text_encoder_2 present): CLIP-L under `conditioner.embedders.0.transformer.`, OpenCLIP-G
    under `conditioner.embedders.1.model.`. SD2.x (`openclip_te1`): OpenCLIP-H under
    `cond_stage_model.model.`. Order follows the input order.
    """
    out: list[FileEntry] = []
    if "unet" in params:
        d2l, _ = diffusers_to_ldm([n for n, _ in params["unet"]])
        out += [FileEntry(UNET_PREFIX + d2l[n], tuple(s), (("unet", n),)) for n, s in params["unet"]]
    sgm = "text_encoder_2" in params
    for component in ("text_encoder", "text_encoder_2"):
        if component not in params:
            continue
        if component == "text_encoder" and not openclip_te1:
            prefix = "conditioner.embedders.0.transformer." if sgm else "cond_stage_model.transformer."
            out += [FileEntry(prefix + canonical_clip_name(n), tuple(s), ((component, n),)) for n, s in params[component]]
            continue
        prefix = "conditioner.embedders.1.model." if component == "text_encoder_2" else "cond_stage_model.model."
        fused: dict[str, list] = {}
        for n, s in params[component]:
            hit = transformers_to_openclip(n)
            if hit is None:
                raise ModelError(f"{component}: parameter '{n}' has no OpenCLIP name")
            key, part, transposed = hit
            if part is None:
                shape = tuple(reversed(s)) if transposed else tuple(s)
                out.append(FileEntry(prefix + key, shape, ((component, n),), transposed))
                continue
            slot = fused.setdefault(key, [None, None, None, tuple(s)])
            slot[part] = n
            if all(x is not None for x in slot[:3]):
                s0 = slot[3]
                out.append(FileEntry(prefix + key, (3 * s0[0], *s0[1:]), tuple((component, x) for x in slot[:3])))
        incomplete = [k for k, v in fused.items() if any(x is None for x in v[:3])]
        if incomplete:
            raise ModelError(f"{component}: q/k/v incomplete for '{incomplete[0]}'")
    return out
