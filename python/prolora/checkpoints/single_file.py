"""Reader for single-file checkpoints (SD1.x LDM, SD2.x, SDXL SGM; also UNet-only files with
bare LDM keys or diffusers keys), plus the diffusers -> single-file key plan used to write them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from ..safetensors_io import read_header
from .build import Component, Tensors, assemble, clip_from_openclip, clip_from_transformers, unet_from_diffusers, unet_from_ldm
from .clip_keys import CLIP_PREFIXES, OPENCLIP_PREFIXES, canonical_clip_name, transformers_to_openclip
from .model import BaseModel
from .unet_keys import LDM_ROOTS, diffusers_to_ldm

UNET_PREFIX = "model.diffusion_model."


def _has(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def open_single_file(path: Path) -> BaseModel:
    """Open a .safetensors checkpoint by its header; UNet keys are required."""
    header = read_header(path)
    tensors: Tensors = {k: (path, info) for k, info in header.tensors.items()}
    keys = list(tensors)
    where = str(path)
    comps: list[Component] = []
    if _has(keys, UNET_PREFIX):
        comps.append(unet_from_ldm(tensors, where, UNET_PREFIX))
    elif _has(keys, "input_blocks.") or _has(keys, "output_blocks."):
        comps.append(unet_from_ldm({k: v for k, v in tensors.items() if k.startswith(LDM_ROOTS + ("label_emb.",))},
                                   where, ""))
        stray = [k for k in keys if not k.startswith(LDM_ROOTS + ("label_emb.",))]
        if stray:
            raise ModelError(f"{path}: UNet key '{stray[0]}' maps nowhere in the LDM -> diffusers map")
    elif _has(keys, "down_blocks.") and _has(keys, "up_blocks."):
        comps.append(unet_from_diffusers(tensors, where))
    elif any(".double_blocks." in k or k.startswith("double_blocks.") for k in keys):
        raise ModelError(f"{path}: a Flux (BFL) checkpoint; only UNet models (SD1.x, SD2.x, SDXL, SSD-1B) "
                         "are supported")
    else:
        raise ModelError(f"{path}: no UNet keys (expected 'model.diffusion_model.*', LDM 'input_blocks.*' "
                         "or diffusers 'down_blocks.*'); is this a VAE, a text encoder or a LoRA?")
    for prefix, component in CLIP_PREFIXES.items():
        if _has(keys, prefix):  # old SD1 files lack `text_model.`: names are normalised
            comps.append(clip_from_transformers(tensors, component, prefix))
    for prefix, component in OPENCLIP_PREFIXES.items():
        if _has(keys, prefix + "transformer.resblocks."):
            comps.append(clip_from_openclip(tensors, component, prefix, projection=component == "text_encoder_2"))
    return assemble(path, "single-file", comps, {"single-file": path}, {path: header}, name=path.stem)


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
