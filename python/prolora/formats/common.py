"""Shared pieces of the LoRA readers and writers: collecting a file's tensors into modules and
checking that each module is a well-formed low-rank pair.

Every error names the file and the offending key, on one line.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch

from ..errors import InvalidLoraError
from ..lora import LoraModule

# Roles a tensor can play in a module.
DOWN, UP, ALPHA, BIAS = "down", "up", "alpha", "bias"
# LyCORIS tensor suffixes (kohya and ComfyUI module names) -> role (formats.adapters reads them)
ADAPTER_SUFFIXES = {"lora_mid.weight": "mid", "dora_scale": "dora_scale", "diff": "diff", "diff_b": "diff_b",
                    **{s: s for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                                      "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                      "lokr_t2")}}
ADAPTER_SUFFIX_RE = "|".join(k.replace(".", r"\.") for k in sorted(ADAPTER_SUFFIXES, key=len, reverse=True))


class Collector:
    """Gathers (module, role) -> tensor, refusing a module that appears twice under any spelling."""

    def __init__(self, path: Path | str | None):
        self.path = path
        self.modules: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # module -> role -> (key, tensor)

    def add(self, module: str, role: str, key: str, tensor: torch.Tensor) -> None:
        parts = self.modules.setdefault(module, {})
        if role in parts:
            first = parts[role][0]
            raise InvalidLoraError(
                f"{self.path}: module '{module}' appears twice: '{first}' and '{key}' are both its {role} "
                "tensor; keep one spelling"
            )
        parts[role] = (key, tensor)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`. A sum is finite exactly when every term is, and no sum of finite
    float16 values can overflow float32 (nor of float32/bfloat16 values float64), so one reduction
    answers it, several times faster than isfinite().all() on every LoRA factor read or written."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    if t.is_complex() or t.dtype == torch.float64:
        return bool(torch.isfinite(t).all())
    if t.dtype.itemsize == 1:  # float8: few kernels exist for float8 types
        t = t.float()
    return math.isfinite(t.sum(dtype=torch.float32 if t.dtype == torch.float16 else torch.float64).item())


def alpha_value(path: Path | str | None, key: str, t: torch.Tensor) -> float:
    """A module's alpha as a float: one finite number (0-d, or a single element)."""
    if t.numel() != 1:
        raise InvalidLoraError(
            f"{path}: alpha '{key}' has shape {tuple(t.shape)}; an alpha must be a single number"
        )
    if t.dtype == torch.bool or t.is_complex():
        raise InvalidLoraError(f"{path}: alpha '{key}' has dtype {t.dtype}; expected a real number")
    value = float(t.reshape(-1)[0].float().item())
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidLoraError(f"{path}: alpha '{key}' is {value}; an alpha must be finite")
    return value


def check_pair(path: Path | str | None, module: str, down: torch.Tensor, up: torch.Tensor,
               down_key: str, up_key: str, bias: torch.Tensor | None = None,
               bias_key: str = "") -> None:
    """Raise InvalidLoraError unless (down, up[, bias]) form a valid linear or conv LoRA pair."""
    for key, t in ((down_key, down), (up_key, up)):
        if not t.is_floating_point():
            raise InvalidLoraError(f"{path}: '{key}' has dtype {t.dtype}; LoRA weights must be floating point")
        if t.dim() not in (2, 4):
            raise InvalidLoraError(
                f"{path}: '{key}' has shape {tuple(t.shape)}; LoRA weights must be 2-D (linear) or 4-D (conv)"
            )
    r = int(down.shape[0])
    if r == 0:
        raise InvalidLoraError(f"{path}: '{down_key}' has rank 0 (shape {tuple(down.shape)})")
    if down.dim() != up.dim():
        raise InvalidLoraError(
            f"{path}: module '{module}': '{down_key}' is {down.dim()}-D {tuple(down.shape)} but '{up_key}' is "
            f"{up.dim()}-D {tuple(up.shape)}; a conv LoRA needs both 4-D, a linear LoRA both 2-D"
        )
    if int(up.shape[1]) != r:
        raise InvalidLoraError(
            f"{path}: module '{module}': '{down_key}' has rank {r} but '{up_key}' has rank {int(up.shape[1])} "
            f"(shapes {tuple(down.shape)} and {tuple(up.shape)})"
        )
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise InvalidLoraError(
            f"{path}: module '{module}': conv up '{up_key}' has shape {tuple(up.shape)}; it must be [out, r, 1, 1]"
        )
    if down[0].numel() == 0 or int(up.shape[0]) == 0:
        raise InvalidLoraError(
            f"{path}: module '{module}': '{down_key}' {tuple(down.shape)} / '{up_key}' {tuple(up.shape)} "
            "have an empty dimension"
        )
    if bias is not None:
        if tuple(bias.shape) != (int(up.shape[0]),):
            raise InvalidLoraError(
                f"{path}: module '{module}': bias '{bias_key}' has shape {tuple(bias.shape)}, expected "
                f"({int(up.shape[0])},) to match '{up_key}'"
            )
    for key, t in ((down_key, down), (up_key, up), (bias_key, bias)):
        if t is not None and not all_finite(t):
            raise InvalidLoraError(f"{path}: '{key}' contains NaN or Inf values")


def common_dtype(modules: Iterable[LoraModule]) -> torch.dtype:
    """The dtype of the up/down tensors (the most common one if they differ)."""
    counts = Counter()
    for m in modules:
        counts[m.down.dtype] += 1
        counts[m.up.dtype] += 1
    return counts.most_common(1)[0][0] if counts else torch.float16


def validate_for_write(path: Path | str, modules: dict[str, LoraModule]) -> None:
    """Check modules before writing, so prolora never writes a file it would refuse to read."""
    for name, m in modules.items():
        if m.key != name:
            raise InvalidLoraError(f"{path}: module stored under '{name}' says its key is '{m.key}'")
        check_pair(path, name, m.down, m.up, f"{name} (down)", f"{name} (up)", m.bias, f"{name} (bias)")
        if m.alpha is not None:
            a = float(m.alpha)
            if a != a or a in (float("inf"), float("-inf")):
                raise InvalidLoraError(f"{path}: module '{name}' has alpha {a}; an alpha must be finite")


def folded_up(m: LoraModule) -> torch.Tensor:
    """`up` with the module's scale multiplied in (for formats that carry no alpha)."""
    s = m.scale
    if s == 1.0:
        return m.up
    return (m.up.to(torch.float64) * s).to(m.up.dtype)
