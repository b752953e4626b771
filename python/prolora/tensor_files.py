"""Base-model tensor files of every storage prolora reads, behind one header and one file handle:
safetensors (safetensors_io), GGUF (gguf_io), and quantized safetensors whose weights need a
scale to mean anything:

| storage | recognised by | read as |
|---|---|---|
| ComfyUI scaled fp8 | `<stem>.scale_weight` (one float) beside an fp8 `<stem>.weight` | weight.float() * scale_weight |
| plain fp8 | F8_E4M3 / F8_E5M2 weights, no scales | weight.float() |
| bitsandbytes int8 | `<stem>.SCB` (one float per row) beside an I8 `<stem>.weight` | weight * SCB / 127 per row |
| bitsandbytes NF4 / FP4 | `.quant_state.bitsandbytes__nf4` / `__fp4` keys | refused by name (blockwise, double-quantized) |
| SVDQuant / nunchaku | `.wscales` / `.smooth_factor` / `.qweight` keys | refused by name (4-bit with a low-rank branch) |

The header handed to the families hides the scale tensors, so every key map applies unchanged;
`dtype` stays the stored one (F8_E4M3, I8, Q8_0, ...) and names the quantization in reports.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from . import gguf_io
from .errors import InputFileError, UnsupportedFormatError
from .safetensors_io import Header, SafetensorsFile, read_header as read_safetensors_header

SCALE = ".scale_weight"
SCALE_EXTRA = (".scale_input", "scaled_fp8")  # ComfyUI's other scaled-fp8 keys: not weights
SCB = ".SCB"
BNB_4BIT = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
NUNCHAKU = (".wscales", ".smooth_factor", ".smooth_factor_orig", ".qweight")
# nominal bits per weight of each stored dtype (a warning at 4 and below)
BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "I8": 8, **gguf_io.BITS}


def _refuse(path: Path, keys) -> None:
    for k in keys:
        if k.endswith(BNB_4BIT):
            kind = "NF4" if k.endswith("nf4") else "FP4"
            raise UnsupportedFormatError(
                f"{path}: a bitsandbytes {kind} (4-bit) checkpoint ('{k}'): its blockwise, double-quantized "
                "weights are not read; dequantize it (or use the model's bf16/fp8/GGUF file)")
        if k.endswith(NUNCHAKU):
            raise UnsupportedFormatError(
                f"{path}: an SVDQuant (nunchaku) 4-bit checkpoint ('{k}'): its quantized weights and low-rank "
                "branch are not read; use the model's bf16/fp8/GGUF file")


def _scales(header: Header) -> dict[str, tuple[str, str]]:
    """{weight key: (scale key, kind)} for ComfyUI scaled-fp8 and bitsandbytes int8 weights. A
    scale beside its weight that fits neither reading (a scale_weight of more than one value, an
    SCB of another length than the weight's rows or beside a weight that is not I8) is refused:
    reading the weight without it would be silently wrong."""
    out = {}
    for k, info in header.tensors.items():
        if k.endswith(SCALE):
            w = k[: -len(SCALE)] + ".weight"
            if w not in header.tensors:
                continue
            if info.numel != 1:
                raise InputFileError(f"{header.path}: scale '{k}' has {info.numel} values; a scaled-fp8 weight's "
                                     "scale is one float")
            out[w] = (k, "scaled-fp8")
        elif k.endswith(SCB):
            w = k[: -len(SCB)] + ".weight"
            target = header.tensors.get(w)
            if target is None:
                continue
            rows = target.shape[0] if target.shape else 0
            if target.dtype != "I8" or info.numel != rows:
                raise InputFileError(f"{header.path}: int8 scale '{k}' ({info.numel} values) does not fit '{w}' "
                                     f"({target.dtype}, {rows} rows): bitsandbytes stores one per row of an I8 weight")
            out[w] = (k, "int8")
    return out


def read_header(path: str | os.PathLike) -> Header:
    """The header of a base-model file: GGUF by its magic, else safetensors; scale tensors hidden,
    unreadable quantizations refused by name."""
    path = Path(path)
    if path.is_file() and gguf_io.is_gguf(path):
        return gguf_io.read_header(path)
    header = read_safetensors_header(path)
    _refuse(path, header.tensors)
    scales = _scales(header)
    if not scales:
        return header
    hidden = {s for s, _ in scales.values()} | {k for k in header.tensors if k.endswith(SCALE_EXTRA)}
    return replace(header, tensors={k: v for k, v in header.tensors.items() if k not in hidden})


def open_file(path: Path):
    """A handle with get / get_rows / runs / close for any base-model file."""
    if gguf_io.is_gguf(path):
        return gguf_io.GgufFile(path)
    f = SafetensorsFile(path)
    try:
        _refuse(path, f.header.tensors)
        scales = _scales(f.header)
    except BaseException:
        f.close()
        raise
    return ScaledFile(f, scales) if scales else f


class ScaledFile:
    """A safetensors file whose scaled weights are read dequantized (float32)."""

    def __init__(self, f: SafetensorsFile, scales: dict[str, tuple[str, str]]):
        self.f, self.scales, self.path, self.header = f, scales, f.path, f.header
        self._values: dict[str, torch.Tensor] = {}

    def _scale(self, name: str) -> torch.Tensor:
        key, kind = self.scales[name]
        if key not in self._values:
            s = self.f.get(key).float().reshape(-1)
            if not bool(torch.isfinite(s).all()):
                raise InputFileError(f"{self.path}: scale '{key}' is not finite")
            self._values[key] = s / 127.0 if kind == "int8" else s
        return self._values[key]

    def get(self, name: str) -> torch.Tensor:
        t = self.f.get(name)
        return self._dequantized(name, t, 0) if name in self.scales else t

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self.f.get_rows(name, start, stop)
        return self._dequantized(name, t, start) if name in self.scales else t

    def _dequantized(self, name: str, t: torch.Tensor, start: int) -> torch.Tensor:
        s = self._scale(name)
        if s.numel() == 1:
            return t.float() * s[0]
        rows = s[start:start + t.shape[0]].reshape(-1, *([1] * (t.dim() - 1)))
        return t.float() * rows

    def runs(self, name: str, runs: list[tuple[int, int]]) -> bytes:
        info = self.f.info(name)
        row = math.prod(info.shape[1:]) if len(info.shape) > 1 else 1
        out = []
        for i, n in runs:
            r, c = divmod(i, row)
            out.append(self.get_rows(name, r, r + 1).reshape(-1)[c:c + n].float().numpy().tobytes())
        return b"".join(out)

    def info(self, name: str):
        return self.f.info(name)

    def keys(self) -> list[str]:
        return self.f.keys()

    def close(self) -> None:
        self.f.close()


def quantization(model) -> dict | None:
    """{"dtypes": {stored dtype: weights}, "bits": lowest nominal bits, "storage": ...} of a model's
    LoRA-able weights when any is stored below 16 bits, else None."""
    counts = Counter(ref.dtype for ref in model.weights.values())
    low = {d: n for d, n in counts.items() if BITS.get(d, 16) < 16}
    if not low:
        return None
    storage = "GGUF" if any(isinstance(h, gguf_io.GgufHeader) for h in model.headers.values()) else "safetensors"
    return {"dtypes": dict(counts), "bits": min(BITS.get(d, 16) for d in low), "storage": storage}


def quantization_warnings(model, role: str) -> list[str]:
    """A warning when a model's weights are stored at 4 bits or fewer (bases come from the
    dequantized weights, so they carry the quantization error)."""
    q = quantization(model)
    if q is None or q["bits"] > 4:
        return []
    names = ", ".join(sorted(d for d in q["dtypes"] if BITS.get(d, 16) <= 4))
    return [f"{role} {model.name} is stored at {q['bits']} bits per weight ({names}, {q['storage']}): its bases are "
            "those of the dequantized weights, so phi and the projection carry the quantization error"]
