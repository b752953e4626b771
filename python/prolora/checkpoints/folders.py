"""Diffusers component folders, for every family's folder reader: which safetensors files hold a
component's weights (plain, fp16 variant, sharded), their headers, and a config's class name.

Per component it picks the full-precision weights when present, else the fp16 variant (else any
other variant), as one file or as shards listed by a `*.safetensors.index[.variant].json`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import CorruptFileError, ModelError, PickleRefusedError
from ..safetensors_io import Header, read_header
from .encoders import Tensors

_BASES = r"(diffusion_pytorch_model|model)"
_SINGLE = re.compile(_BASES + r"(?:\.(\w+))?\.safetensors$")
_INDEX = re.compile(_BASES + r"\.safetensors\.index(?:\.(\w+))?\.json$")
_PICKLED = re.compile(r".*\.(bin|ckpt|pt|pth)$")


def _variant_rank(variant: str | None) -> tuple[int, str]:
    return (0, "") if variant is None else (1, "") if variant == "fp16" else (2, variant)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files that hold one component's weights (see module doc for the choice)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    choices: list[tuple[tuple[int, str], int, str]] = []
    for n in names:
        if m := _SINGLE.match(n):
            choices.append((_variant_rank(m.group(2)), 0, n))
        elif m := _INDEX.match(n):
            choices.append((_variant_rank(m.group(2)), 1, n))
    if not choices:
        if any(_PICKLED.match(n) for n in names):
            raise PickleRefusedError(
                f"{folder}: only pickled weights (.bin/.ckpt) here; prolora never unpickles. "
                "Convert them to .safetensors with a tool you trust.")
        raise ModelError(f"{folder}: no weights (expected diffusion_pytorch_model[.fp16].safetensors, "
                         "model[.fp16].safetensors or a *.safetensors.index.json)")
    _, is_index, chosen = min(choices)
    if not is_index:
        return [folder / chosen]
    index = folder / chosen
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise CorruptFileError(f"{index}: not a safetensors index (expected a JSON object with 'weight_map')") from None
    shards = sorted(set(weight_map.values()))
    for s in shards:
        if not isinstance(s, str) or "/" in s or "\\" in s or not (folder / s).is_file():
            raise ModelError(f"{index}: points at shard '{s}', which is missing from {folder}")
    return [folder / s for s in shards]


def read_component(folder: Path, root: Path, files: dict[str, Path], headers: dict[Path, Header]) -> Tensors:
    """Every tensor of the component's chosen files, by key; records files and headers."""
    tensors: Tensors = {}
    for f in weight_files(folder):
        header = read_header(f)
        files[f.relative_to(root).as_posix()] = f
        headers[f] = header
        for key, info in header.tensors.items():
            if key in tensors:
                raise ModelError(f"{f}: tensor '{key}' also appears in {tensors[key][0]}")
            tensors[key] = (f, info)
    return tensors


def class_name(config: Path) -> str:
    """The `_class_name` of a diffusers config.json / model_index.json, "" when absent or unreadable."""
    try:
        return str(json.loads(config.read_text()).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def config_of(folder: Path) -> dict:
    """A component folder's config.json as a dict ({} when absent or unreadable)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}
