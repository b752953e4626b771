"""GGUF base models written by the `gguf` package (as ComfyUI-GGUF's converter does: original key
names, 2-D weights quantized, the rest F32), and the same weights dequantized into safetensors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from prolora.safetensors_io import load_all, save


def _qtype(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def write_gguf(src: Path, out: Path, qtype: str = "Q8_0", prefix: str = "", arch: str = "flux",
               extra_kv: dict | None = None) -> Path:
    """Every tensor of the safetensors file `src` into a GGUF at `out`: 2-D weights whose rows fit
    the quantization's blocks as `qtype`, everything else F32; names as in `src` (plus `prefix`)."""
    from gguf import GGML_QUANT_SIZES, GGUFWriter
    from gguf.quants import quantize

    tensors, _ = load_all(src)
    q = _qtype(qtype)
    block = GGML_QUANT_SIZES[q][0]
    w = GGUFWriter(str(out), arch)
    for k, v in (extra_kv or {}).items():
        w.add_string(k, v)
    for name, t in tensors.items():
        a = t.float().numpy()
        if t.dim() == 2 and t.shape[1] % block == 0:
            w.add_tensor(prefix + name, quantize(a, q), raw_dtype=q)
        else:
            w.add_tensor(prefix + name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def dequantized_safetensors(gguf_path: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """The GGUF's tensors dequantized by `gguf`'s own reader, written as safetensors."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(str(gguf_path))
    tensors = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        a = dequantize(np.asarray(t.data), t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.array(a, np.float32)).reshape(shape).to(dtype)
    save(out, tensors)
    return out
