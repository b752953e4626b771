"""read_lora / write_lora: one canonical LoraFile in, any supported format out."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import InvalidLoraError, OptionError, OutputPathError
from ..lora import FORMATS, LoraFile, LoraModule
from ..safetensors_io import load_all, save
from . import adapters, peft
from .common import ALPHA, BIAS, DOWN, UP, Collector, alpha_value, check_pair, common_dtype, validate_for_write
from .detect import FORMAT_MODULES, classify
from .lowrank import Conversion
from .parts import assemble_parts


def build_modules(col: Collector, conversion=None) -> dict[str, LoraModule]:
    """Validate collected parts and turn them into LoraModules; adapters other than a plain pair
    (LoKr, LoHa, Tucker, full differences, DoRA) through formats.adapters, converted to a LoRA by
    `conversion` (a lowrank.Conversion; default bound when None)."""
    path = col.path
    out: dict[str, LoraModule] = {}
    for module, t in col.modules.items():
        if not set(t) <= {DOWN, UP, ALPHA, BIAS}:
            out[module] = adapters.build(path, module, t, conversion or Conversion())
            continue
        if DOWN not in t or UP not in t:
            have_key = t[DOWN if DOWN in t else UP if UP in t else next(iter(t))][0]
            missing = " and ".join(r for r in (DOWN, UP) if r not in t)
            raise InvalidLoraError(
                f"{path}: '{have_key}' has no matching {missing} weight (module '{module}'); a LoRA module "
                "needs both its down and up weights"
            )
        (down_key, down), (up_key, up) = t[DOWN], t[UP]
        bias_key, bias = t.get(BIAS, ("", None))
        check_pair(path, module, down, up, down_key, up_key, bias, bias_key)
        alpha = alpha_value(path, t[ALPHA][0], t[ALPHA][1]) if ALPHA in t else None
        out[module] = LoraModule(key=module, down=down, up=up, alpha=alpha, bias=bias)
    return out


def read_lora(path: str | os.PathLike, conversion: Conversion | None = None) -> LoraFile:
    """Load a (small) LoRA file, detect its format from the keys, validate every module.
    Adapters that are not a plain pair (LoKr, LoHa, full differences) become the LoRA nearest
    their dW by `conversion` (its error bound or fixed rank; formats.lowrank)."""
    path = Path(path)
    tensors, metadata = load_all(path)
    return lora_from_tensors(tensors, metadata, path, conversion)


def lora_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      path: Path | str = "<state dict>", conversion: Conversion | None = None) -> LoraFile:
    """A LoRA held in memory (a state dict as a LoRA file would hold it, with that file's metadata
    if any): format detected from the keys, every module validated, as `read_lora` does. `path`
    names it in messages; a LoraFile built from memory has no path."""
    metadata = metadata or {}
    found = classify(path, tensors)
    col = Collector(path)
    for key, (module, role) in found.weights.items():
        col.add(module, role, key, tensors[key])
    for key, module in found.alphas.items():
        col.add(module, ALPHA, key, tensors[key])
    modules = build_modules(col, conversion)
    if found.format == peft.NAME:
        peft.apply_metadata_alphas(path, modules, metadata)
    return LoraFile(
        format=found.format, modules=modules, metadata=dict(metadata), dtype=common_dtype(modules.values()),
        path=path if isinstance(path, Path) else None, dropped=found.dropped,
    )


def _update_ss(md: dict[str, str], key: str, values: list[float], spell) -> None:
    """Refresh a kohya `ss_network_*` entry the input had, if the modules no longer match it."""
    if key not in md:
        return
    distinct = set(values)
    if not distinct:
        return
    try:
        old = float(md[key])
    except ValueError:
        old = None  # "Dynamic" or another non-number
    if len(distinct) == 1:
        (value,) = distinct
        if old != value:
            md[key] = spell(value)
    elif old is not None:
        md[key] = "Dynamic"  # what kohya's resize_lora writes for per-module ranks/alphas


def output_metadata(lora: LoraFile, fmt: str) -> dict[str, str]:
    """The input's metadata (as strings), kept; scale-bearing entries refreshed for `fmt`.

    A stale `lora_adapter_metadata` is always removed: diffusers applies it to whatever the file
    holds (and refuses a kohya file that has both alphas and it), so only the peft writer emits one.
    """
    md = {str(k): str(v) for k, v in lora.metadata.items()}
    md.pop(peft.METADATA_KEY, None)
    mod = FORMAT_MODULES[fmt]
    # kohya's network_dim/alpha cover linear and 1x1-conv modules; larger convs (LoCon) have their
    # own conv_dim/conv_alpha inside ss_network_args, which is left as is
    mods = [m for m in lora.modules.values() if not m.is_conv or tuple(m.down.shape[2:]) == (1, 1)]
    _update_ss(md, "ss_network_dim", [float(m.rank) for m in mods], lambda v: str(int(v)))
    _update_ss(md, "ss_network_alpha", [mod.effective_alpha(m) for m in mods], lambda v: str(float(v)))
    if fmt == peft.NAME:
        md["format"] = "pt"
        adapter = peft.adapter_metadata(lora.modules)
        if adapter is not None:
            md[peft.METADATA_KEY] = adapter
    return md


def write_lora(path: str | os.PathLike, lora: LoraFile, format: str | None = None) -> None:
    """Write `lora` atomically in `format` (default: its own). Module keys must already be spelled
    for that format; formats without alpha (comfy, diffusers-old, xlabs) get the scale folded into up.

    Per-slice parts of a fused module (keys `<module>[rows/total]`, made by the plan for Flux's
    fused q/k/v[/mlp] weights) are first assembled into their module (formats.parts); `lora.modules`
    is updated to the assembled modules, so that the object matches the file."""
    fmt = format or lora.format
    assembled = assemble_parts(lora.modules)
    if fmt == peft.NAME:  # scale folded in, alpha = rank: diffusers (metadata) and ComfyUI (none) agree
        assembled = peft.unit_scales(assembled)
    if assembled is not lora.modules:
        lora.modules = assembled
    if fmt not in FORMATS:
        raise OptionError(f"unknown LoRA format '{fmt}'; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if lora.path is not None and path.exists() and path.resolve() == Path(lora.path).resolve():
        raise OutputPathError(f"{path}: is the input LoRA; refusing to overwrite an input, choose another output")
    if not lora.modules:
        raise InvalidLoraError(f"{path}: nothing to write: the LoRA has no modules")
    validate_for_write(path, lora.modules)
    tensors = FORMAT_MODULES[fmt].to_tensors(lora, path)
    save(path, tensors, output_metadata(lora, fmt))
