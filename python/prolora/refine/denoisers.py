"""The denoisers S and T as diffusers models, built from the base models prolora reads.

- diffusers folders (a pipeline with the denoiser's component folder, or a bare component folder):
  the model class's own `from_pretrained` on the component folder, local files only, in the
  stored dtype (the fp16 variant when that is what the folder holds);
- single files: the family's refine part (parts.py) builds the diffusers model from a config read
  off the weights' shapes and gives its state dict, read through the family's own key maps (the
  plans that write such files, read backwards), so no key map is written twice.

The models come back in eval mode with every parameter frozen: only the LoRA factors train.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..checkpoints import BaseModel
from ..checkpoints.folders import weight_files
from ..errors import ModelError
from .parts import part_of, parts

_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def model_dtype(base: BaseModel, component: str) -> torch.dtype:
    """The stored floating dtype of the denoiser's weights (the most common one)."""
    counts: dict[str, int] = {}
    for ref in base.weights.values():
        if ref.module.startswith(component + "."):
            counts[ref.dtype] = counts.get(ref.dtype, 0) + ref.numel
    if not counts:
        raise ModelError(f"{base.path}: no {component} weights")
    return _DTYPES.get(max(counts, key=counts.get), torch.float32)


def denoiser_component(base: BaseModel) -> str:
    """Which component of `base` the refinement trains against ('unet', 'transformer', ...), as
    its family's refine part says. Families without one (e.g. Qwen-Image, Wan) are refused by name."""
    return part_of(base).COMPONENT


def build_denoiser(base: BaseModel, device: str = "cpu", compute: str | None = None) -> torch.nn.Module:
    """The diffusers denoiser of `base` (e.g. UNet2DConditionModel, FluxTransformer2DModel), on
    `device`, in the stored dtype, eval mode, parameters frozen. `compute="cpu"`: half-precision
    weights are upcast to float32 (a CPU has no fast float16 kernels: 1.4x slower on the tiny SDXL
    pair, issue 27)."""
    part = part_of(base)
    dtype = model_dtype(base, part.COMPONENT)
    if compute == "cpu" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    if base.layout == "diffusers":
        model = _from_folder(Path(base.path), part, dtype)
    else:
        model = _filled(*part.from_single_file(base, dtype), Path(base.path))
    model.requires_grad_(False)
    return model.to(device).eval()


def _component_folder(path: Path, component: str) -> Path:
    return path / component if (path / component).is_dir() else path


def _from_folder(path: Path, part, dtype: torch.dtype) -> torch.nn.Module:
    folder = _component_folder(path, part.COMPONENT)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise ModelError(f"{folder}: config.json is missing or not JSON") from None
    cls = _model_class(config.get("_class_name") or part.DEFAULT_CLASS or "", folder)
    variant = _variant(folder)
    try:
        return cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, variant=variant,
                                   use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{folder}: diffusers could not build {cls.__name__} from it: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _variant(folder: Path) -> str | None:
    """The diffusers variant ("fp16", ...) of the weights prolora's reader picks in `folder`."""
    m = re.search(r"\.(\w+)\.safetensors$", weight_files(folder)[0].name)
    return m.group(1) if m else None


def _model_class(name: str, where: Path):
    classes = [c for _, part in parts() for c in part.CLASSES]
    if name not in classes:
        raise ModelError(f"{where}: refinement needs a denoiser of class {', '.join(classes)}; config names {name!r}")
    import diffusers

    return getattr(diffusers, name)


def _filled(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
    """`model` (built on the meta device) with `state` assigned, every tensor there and of its shape."""
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ModelError(f"{path}: no tensor for the model's '{missing[0]}' ({len(missing)} missing)")
    bad = next((n for n, p in model.state_dict().items() if tuple(state[n].shape) != tuple(p.shape)), None)
    if bad is not None:
        raise ModelError(f"{path}: '{bad}' has shape {tuple(state[bad].shape)}, the model expects "
                         f"{tuple(model.state_dict()[bad].shape)}")
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, assign=True)
    return model


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers take."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


__all__ = ["build_denoiser", "denoiser_component", "model_dtype", "parameter_bytes"]
