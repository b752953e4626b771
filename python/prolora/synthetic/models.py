"""Synthetic base models on disk: write_model, and the SD-family layouts (a diffusers pipeline
folder or one single file with LDM/SGM keys); other families' configs write themselves (their
synthetic parts, e.g. prolora.families.flux.synthetic).

Files are written one tensor at a time (writing.write_tensors), never the whole model in memory.
A TARGET model is its source plus a fine-tune-like perturbation of each weight (values.Values).
"""
from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..checkpoints import BaseModel
from ..families import open_model
from ..families.sd.read import single_file_plan
from .configs import UNET_DEFAULTS, ConfigLike, ModelConfig, TextEncoderConfig, resolve
from .params import Params, model_params
from .values import Perturbation, Values
from .writing import WEIGHTS, write_tensors


def write_model(path: str | os.PathLike, cfg: ConfigLike = "sdxl:tiny", layout: str = "diffusers",
                dtype: torch.dtype = torch.float16, seed: int = 0, base: str | os.PathLike | BaseModel | None = None,
                perturbation: Perturbation | float = Perturbation(), threads: int | None = None,
                shard_bytes: int = 10 * 2**30, device: str | None = None) -> Path:
    """Write a synthetic base model; returns its path.

    `cfg`: a ModelConfig, a family part's config (FluxConfig, ...) or a preset name ("sdxl",
    "sd15:tiny", "ssd-1b:small", "flux-dev", "flux-schnell:tiny", ...).
    `layout`: "diffusers" (a pipeline folder at `path`; Flux: transformer/ in shards of at most
    `shard_bytes`, with an index) or "single-file" (one .safetensors file; Flux: BFL keys), and for
    Flux "single-file-prefixed" (BFL keys under ComfyUI's `model.diffusion_model.`).
    `base`: a source model (path or BaseModel) written earlier with the same config and seed;
    the result is then a TARGET: each source weight plus a `perturbation` (relative Frobenius
    size, or a Perturbation); other parameters equal the source's. A base of another family
    (FLUX.1-schnell under a "chroma" config) gives a derived model: the weights both have are
    perturbed from the base, the ones only the config has are drawn fresh.
    `threads`: torch threads while generating (default: 1 below 100M parameters, else torch's).
    `device`: draw the values on this device (e.g. "cuda": a full-size pair in seconds); the
    values then differ from the CPU's, the shapes and layout do not.
    """
    cfg = resolve(cfg)
    layouts = getattr(cfg, "layouts", ("diffusers", "single-file"))
    if layout not in layouts:
        raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(layouts)}")
    path = Path(path)
    params = model_params(cfg)
    numel = sum(math.prod(s) for plist in params.values() for _, s in plist)
    with model_values(cfg.family, seed, base, perturbation, device, threads, numel,
                      derived_from=getattr(cfg, "derived_from", ())) as (values, meta):
        if not isinstance(cfg, ModelConfig):  # a family part's config writes itself
            cfg.write(path, params, layout, values, dtype, meta, shard_bytes)
        elif layout == "single-file":
            _write_single_file(path, cfg, params, values, dtype, meta)
        else:
            _write_folder(path, cfg, params, values, dtype, meta)
    return path


@contextmanager
def model_values(family: str, seed: int, base: str | os.PathLike | BaseModel | None,
                 perturbation: Perturbation | float, device: str | None = None, threads: int | None = None,
                 numel: int = 0, derived_from: Iterable[str] = (), **facts) -> Iterator[tuple[Values, dict[str, str]]]:
    """(Values, file metadata) for writing one synthetic model of `family`: a source (`base`
    None) or a target of `base` (a path is opened here and closed after; a base of a member in
    `derived_from`, e.g. FLUX.1 for a Chroma config, lends the weights both have and the rest are
    drawn fresh). Runs with `threads` torch threads (None: one below 100M parameters (`numel`),
    else torch's). `facts` go into the metadata."""
    p = Perturbation(size=float(perturbation)) if isinstance(perturbation, (int, float)) else perturbation
    with ExitStack() as stack:
        if base is not None and not isinstance(base, BaseModel):
            base = stack.enter_context(open_model(base))
        derived = base is not None and base.family in tuple(derived_from)
        meta = {"prolora.synthetic": json.dumps({"family": family, **facts, "seed": seed,
                                                 "target_of": base.identity() if base is not None else None,
                                                 "perturbation": asdict(p) if base is not None else None})}
        if threads is None:
            threads = 1 if numel < 100_000_000 else 0
        with _threads(threads):
            yield Values(seed, base, p, device, new_modules=derived), meta


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with n torch threads, restoring the previous count (small matrices run faster on one
    thread, and far faster when other processes compete for the cores)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _write_single_file(path: Path, cfg: ModelConfig, params: dict[str, Params], values: Values, dtype: torch.dtype,
                       meta: dict[str, str]) -> None:
    """One file with LDM/SGM keys, laid out by the reader's own map (single_file_plan)."""
    te1 = cfg.text_encoders.get("text_encoder")
    shapes = {c: dict(plist) for c, plist in params.items()}
    items = []
    for e in single_file_plan(params, openclip_te1=te1 is not None and te1.openclip):
        def make(e=e):
            parts = [values(c, n, shapes[c][n]) for c, n in e.sources]
            t = torch.cat(parts) if len(parts) > 1 else parts[0]
            return t.t() if e.transpose else t
        items.append((e.key, e.shape, make))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(path, items, dtype, meta)


def _write_folder(path: Path, cfg: ModelConfig, params: dict[str, Params], values: Values, dtype: torch.dtype,
                  meta: dict[str, str]) -> None:
    """A diffusers pipeline folder: model_index.json and one folder (config.json + weights) per component."""
    path.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionXLPipeline" if "text_encoder_2" in params else "StableDiffusionPipeline",
             "_diffusers_version": "0.30.0", "unet": ["diffusers", "UNet2DConditionModel"]}
    for comp, plist in params.items():
        folder = path / comp
        folder.mkdir(exist_ok=True)
        if comp == "unet":
            conf, fname = _unet_config_json(cfg), f"{WEIGHTS}.safetensors"
        else:
            te = cfg.text_encoders[comp]
            conf, fname = _clip_config_json(te, dtype), "model.safetensors"
            index[comp] = ["transformers", conf["architectures"][0]]
        (folder / "config.json").write_text(json.dumps(conf, indent=2))
        items = [(n, s, (lambda c=comp, n=n, s=s: values(c, n, s))) for n, s in plist]
        write_tensors(folder / fname, items, dtype, meta)
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


def _unet_config_json(cfg: ModelConfig) -> dict:
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0", **UNET_DEFAULTS, **cfg.unet}


def _clip_config_json(te: TextEncoderConfig, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["CLIPTextModelWithProjection" if te.projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "hidden_size": te.hidden, "intermediate_size": te.intermediate,
        "num_attention_heads": te.heads, "num_hidden_layers": te.layers, "vocab_size": te.vocab,
        "max_position_embeddings": te.max_positions, "projection_dim": te.projection or te.hidden,
        "hidden_act": te.act, "layer_norm_eps": 1e-5, "torch_dtype": str(dtype).replace("torch.", ""),
    }
