"""Opening a base model: one loop over the registry, for a file, a folder or weights in memory.

Each family claims what is its own (strict detection: its required keys, shapes and config class
all match) and no family guesses: an input that none claims is refused in one line that says what
it looks like. The `unsupported` package claims architectures prolora recognises but does not
transfer, to refuse them by name.
"""
from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..checkpoints.memory import InMemory, held, is_in_memory
from ..checkpoints.model import BaseModel
from ..errors import InputFileError, ModelError
from ..safetensors_io import Header
from ..tensor_files import read_header  # safetensors or GGUF, by the file's magic
from .registry import families

__all__ = ["open_model", "in_memory_model", "is_in_memory", "looks_like", "model_of"]


def open_model(path: str | os.PathLike) -> BaseModel:
    """Open a base model by its headers only (no tensor data is read).

    `path`: a diffusers pipeline folder (model_index.json), a bare component folder (config.json,
    e.g. unet/ or a transformer/), or a single .safetensors checkpoint in any layout a registered
    family reads (safetensors, fp8 / scaled fp8 / int8 safetensors, or GGUF). Pickled files are refused.
    """
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{p}: no such file or folder")
    if p.is_file():
        header = read_header(p)
        for fam in families():
            model = fam.claim_file(p, header)
            if model is not None:
                return model
        raise ModelError(f"{p}: {looks_like(header)}")
    for fam in families():
        model = fam.claim_folder(p)
        if model is not None:
            return model
    raise ModelError(f"{p}: {_folder_looks_like(p)}")


def in_memory_model(obj: Any, name: str | None = None) -> BaseModel:
    """A BaseModel over weights held in memory (checkpoints.memory).

    `obj`: a diffusers pipeline, one model (UNet2DConditionModel, FluxTransformer2DModel,
    ChromaTransformer2DModel, QwenImageTransformer2DModel, WanTransformer3DModel, a CLIP or T5
    text encoder, ...), or `(state_dict, config)`: a model's state dict under its diffusers /
    transformers names with that model's config. `name` overrides the name reports give it.
    """
    item: InMemory = held(obj, name)
    for fam in families():
        if fam.claim_memory is None:
            continue
        model = fam.claim_memory(item)
        if model is not None:
            if name:
                model.name = name
            return model
    d = item.denoiser
    what = d.class_name if d is not None else type(obj).__name__
    raise ModelError(f"{what}: not a model prolora reads in memory (no registered family claims it; "
                     f"families: {', '.join(f.title for f in families() if not f.refuses)})")


def looks_like(header: Header) -> str:
    """One phrase on what an unclaimed safetensors file seems to hold."""
    keys = list(header.tensors)
    if any(k.endswith((".lora_down.weight", ".lora_A.weight", ".lora_up.weight", ".lora_B.weight")) for k in keys):
        return "a LoRA, not a base model (pass it as LORA)"
    vae = ("encoder.conv_in.", "decoder.conv_in.", "encoder.down.", "decoder.up.", "encoder.down_blocks.",
           "decoder.up_blocks.", "first_stage_model.")
    if any(k.startswith(vae) for k in keys) and not any("diffusion_model" in k for k in keys):
        return "a VAE, not a diffusion model"
    if any(".SelfAttention." in k or k.startswith(("text_model.", "encoder.block.")) for k in keys):
        return "a text encoder by itself, not a diffusion model"
    sample = ", ".join(f"'{k}'" for k in keys[:3])
    return (f"no registered model family claims this file ({len(keys)} tensors, e.g. {sample}); prolora reads "
            + ", ".join(f.title for f in families() if not f.refuses))


def _folder_looks_like(p: Path) -> str:
    for cfg in (p / "model_index.json", p / "transformer" / "config.json", p / "unet" / "config.json",
                p / "config.json"):
        try:
            name = json.loads(cfg.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            continue
        if name:
            return (f"a {name} folder, which no registered model family reads (prolora reads "
                    + ", ".join(f.title for f in families() if not f.refuses) + ")")
    return ("folder without model weights (expected model_index.json with unet/ or transformer/, or "
            "config.json with *.safetensors)")


def model_of(x: Any, stack: ExitStack) -> BaseModel:
    """A BaseModel for a path, a BaseModel, or weights held in memory (a diffusers pipeline, a
    model module, (state_dict, config): checkpoints.memory)."""
    if isinstance(x, BaseModel):
        return x
    if is_in_memory(x):
        return in_memory_model(x)
    return stack.enter_context(open_model(x))
