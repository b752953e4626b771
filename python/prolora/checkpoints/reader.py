"""open_model: pick the reader for a path (single file, diffusers pipeline, bare component)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputFileError, ModelError
from ..safetensors_io import read_header
from .diffusers_folder import open_component, open_pipeline
from .flux import is_flux_folder, is_flux_keys, open_flux_folder, open_flux_single_file
from .model import BaseModel
from .qwen import is_qwen_folder, is_qwen_keys, open_qwen_folder, open_qwen_single_file
from .single_file import open_single_file
from .wan import is_wan_folder, open_wan_folder, open_wan_single_file, wan_prefix


def open_model(path: str | os.PathLike) -> BaseModel:
    """Open a base model by its headers only (no tensor data is read).

    `path`: a diffusers pipeline folder (model_index.json), a bare component folder (config.json,
    e.g. unet/ or a Flux / Qwen-Image transformer/), or a single .safetensors checkpoint (LDM/SGM, BFL Flux, or
    Qwen-Image with diffusers names).
    Pickled files are refused.
    """
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{p}: no such file or folder")
    if p.is_file():
        header = read_header(p)
        if is_flux_keys(header.tensors) is not None:
            return open_flux_single_file(p, header)
        if wan_prefix(header.tensors) is not None:
            return open_wan_single_file(p, header)
        if is_qwen_keys(header.tensors) is not None:
            return open_qwen_single_file(p, header)
        return open_single_file(p)
    if not (p / "unet").is_dir() and is_flux_folder(p):
        return open_flux_folder(p)
    if not (p / "unet").is_dir() and is_wan_folder(p):
        return open_wan_folder(p)
    if not (p / "unet").is_dir() and is_qwen_folder(p):
        return open_qwen_folder(p)
    if (p / "model_index.json").is_file() or (p / "unet").is_dir():
        return open_pipeline(p)
    if (p / "config.json").is_file():
        return open_component(p)
    raise ModelError(f"{p}: folder without model weights (expected model_index.json and unet/, or "
                     "config.json with *.safetensors)")
